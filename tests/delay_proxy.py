"""A TCP relay that holds every chunk for a fixed delay in each direction.

Stands in for `tc netem delay` on kernels without the netem qdisc. Usage:
    python delay_proxy.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS
"""

import asyncio
import sys


async def pipe(reader, writer, delay):
    queue: asyncio.Queue = asyncio.Queue()

    async def deliver():
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))
            if data is None:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    task = asyncio.create_task(deliver())
    loop = asyncio.get_running_loop()
    while data := await reader.read(65536):
        queue.put_nowait((loop.time() + delay, data))
    queue.put_nowait((loop.time() + delay, None))
    await task


async def main(listen_host, listen_port, target_host, target_port, delay_ms):
    delay = delay_ms / 1000

    async def handle(client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection(target_host, target_port)
        await asyncio.gather(pipe(client_reader, server_writer, delay), pipe(server_reader, client_writer, delay),
                             return_exceptions=True)

    server = await asyncio.start_server(handle, listen_host, listen_port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    host, port, thost, tport, ms = sys.argv[1:6]
    asyncio.run(main(host, int(port), thost, int(tport), float(ms)))
