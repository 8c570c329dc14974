"""The verifier and the drafter on two 'boxes' (network namespaces over a veth pair, 2 ms apart).

Where the kernel has no netem qdisc, the 2 ms each way comes from a userspace TCP relay in the
drafter's namespace (tests/delay_proxy.py); the test says which was used.
"""

import json
import os
import subprocess
import warnings

import pytest

from netns import NetnsUnavailable, TwoBoxes
from tiny_models import save_tiny_pair

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def boxes():
    try:
        b = TwoBoxes("delay 2ms")
    except NetnsUnavailable as err:
        pytest.skip(f"two-box test needs network namespaces: {err}")
    yield b
    b.close()


def _serve(boxes, paths, key, port):
    from specexec.launch.options import READY_LINE
    proc = boxes.popen(boxes.verifier, ["-m", "specexec.launch.cli", "serve", "--target", paths["target"], "--bind",
                                        f"tcp://{boxes.verifier_ip}:{port}", "--key-file", str(key),
                                        "--dtype", "float32"],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    assert line.startswith(READY_LINE), f"verifier did not start: {line!r}"
    return proc


def test_two_boxes_give_the_one_machine_output(boxes, tmp_path):
    paths, _ = save_tiny_pair(tmp_path)
    key = tmp_path / "hmac.key"
    key.write_text("x" * 64)
    key.chmod(0o600)
    port = 5577
    verifier = _serve(boxes, paths, key, port)
    relay = None
    try:
        address = f"tcp://{boxes.verifier_ip}:{port}"
        if boxes.netem is None:
            warnings.warn(f"netem unavailable ({boxes.netem_error}); 2 ms each way from a userspace relay")
            relay = boxes.popen(boxes.drafter, [os.path.join(HERE, "delay_proxy.py"), "127.0.0.1", "6577",
                                                boxes.verifier_ip, str(port), "2"],
                                stdout=subprocess.PIPE, text=True)
            assert relay.stdout.readline().strip() == "ready"
            address = "tcp://127.0.0.1:6577"
        args = ["-m", "specexec.launch.cli", "generate", "w10 w11 w12", "--raw", "--json", "--budget", "6",
                "--max-new-tokens", "20", "--dtype", "float32", "--target", paths["target"], "--draft", paths["draft"]]
        drafter = boxes.popen(boxes.drafter, args + ["--connect", address, "--key-file", str(key)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        out, err = drafter.communicate(timeout=300)
        assert drafter.returncode == 0, err[-2000:]
        remote = json.loads(out)
        local = json.loads(subprocess.run([os.sys.executable] + args + ["--in-process"], capture_output=True,
                                          text=True, cwd=ROOT, check=True).stdout)
        assert remote["token_ids"] == local["token_ids"]
        assert remote["stats"]["bytes_sent"] > 0
    finally:
        verifier.terminate()
        verifier.wait(10)
        if relay:
            relay.terminate()
