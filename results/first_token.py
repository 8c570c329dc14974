"""Time arrival -> first SSE content chunk for the 2nd request to a running `specexec api`."""
import json, sys, time, httpx
url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8123"
msgs = [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}]
with httpx.Client(timeout=600) as c:
    t = time.perf_counter()
    r = c.post(f"{url}/v1/chat/completions", json={"messages": msgs, "max_tokens": 16})
    print("first request:", r.status_code, f"{time.perf_counter() - t:.2f} s", json.dumps(r.json()["choices"][0]["message"])[:80], flush=True)
    for i in range(int(sys.argv[2]) if len(sys.argv) > 2 else 2):
        body = {"messages": [{"role": "user", "content": f"Write a Python function that reverses a string (try {i})."}],
                "max_tokens": 16, "stream": True, **(json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})}
        t = time.perf_counter()
        first_any = first_text = None
        with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter() - t
                first_any = first_any or now
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content") and first_text is None:
                    first_text = now
        total = time.perf_counter() - t
        print(f"streamed request {i}: whole answer {total:.2f} s, first chunk {first_any:.2f} s, first token chunk {first_text:.2f} s", flush=True)
