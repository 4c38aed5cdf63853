"""A TCP proxy that delays every chunk by a fixed time each way: Postgres as if on another host.

Not part of `just bench`: the purchase bench run through it shows what each round trip to Postgres
costs a purchase (BENCHMARKS.md, "Postgres across a network").

    python3 crates/keyfleet/benches/pg_lag_proxy.py 5433 5432 0.5 &   # listen, upstream, ms each way
    DATABASE_URL=postgres://postgres@127.0.0.1:5433/postgres cargo bench -p keyfleet --bench purchase

asyncio's timer wakes on the millisecond, so each direction costs more than asked: with 0.5 a
`SELECT 1` round trip through it took 2.6 ms (pgbench, 500 in a row; 0.09 ms direct), about what a
Postgres in another availability zone, or one behind a busy pooler, costs.
"""
import asyncio, sys
DELAY = float(sys.argv[3]) / 1000
async def pipe(reader, writer):
    loop = asyncio.get_running_loop()
    try:
        while data := await reader.read(65536):
            loop.call_later(DELAY, writer.write, data)
        await asyncio.sleep(DELAY * 2)
    finally:
        writer.close()
async def handle(cr, cw):
    sr, sw = await asyncio.open_connection('127.0.0.1', int(sys.argv[2]))
    await asyncio.gather(pipe(cr, sw), pipe(sr, cw), return_exceptions=True)
async def main():
    server = await asyncio.start_server(handle, '127.0.0.1', int(sys.argv[1]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
