"""How fast the HTTP API accepts jobs, against the SDK's `Farm.submit_many`, in one run.

    python bench/api.py [--jobs 10000] [--singles 2000] [--clients 16] [--rounds 3]

A private Redis, a local store, `farm serve` as its own process (uvicorn, one process), no
workers (jobs are accepted, not run). Each round, alternating:

1. SDK: `Farm.submit_many` of `--jobs` txt2img specs (validate, write records, enqueue).
2. API batch: one `POST /v1/jobs:batch` of the same number of specs (httpx, one connection).
3. API singles: `--singles` `POST /v1/jobs` from `--clients` concurrent clients (asyncio,
   one keep-alive connection each): jobs/s, and the median and p99 latency of one submit.
4. The same singles from `wrk` (Debian's package, if on PATH), `--clients` connections for
   `--seconds`: a load generator in C, so the latency is the server's rather than a Python
   client's on the same two cores (httpx costs about as much CPU a request as the server).

Prints each round and the medians; targets: the batch within 2x of the SDK's rate, p99 of a
single submit under 50 ms on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farm.client import Farm  # noqa: E402
from farm.local.embedded import RedisServer  # noqa: E402
from farm.settings import FarmSettings, settings_env  # noqa: E402


def spec(i: int) -> dict:
    return {
        "kind": "txt2img",
        "model": "tiny",
        "prompt": f"a fox {i}",
        "seed": i,
        "num_inference_steps": 20,
        "height": 64,
        "width": 64,
    }


def sdk_round(farm: Farm, n: int, base: int) -> float:
    t = time.perf_counter()
    farm.submit_many(spec(base + i) for i in range(n))
    return n / (time.perf_counter() - t)


def batch_round(url: str, token: str, n: int, base: int) -> float:
    body = {"jobs": [spec(base + i) for i in range(n)]}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600) as c:
        t = time.perf_counter()
        resp = c.post("/v1/jobs:batch", json=body)
        took = time.perf_counter() - t
    assert resp.status_code == 201 and resp.json()["new"] == n, resp.text[:300]
    return n / took


async def singles_round(
    url: str, token: str, n: int, clients: int, base: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    todo = iter(range(n))

    async def client() -> None:
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as c:
            for i in todo:
                t = time.perf_counter()
                resp = await c.post("/v1/jobs", json=spec(base + i))
                latencies.append(time.perf_counter() - t)
                assert resp.status_code == 201, resp.text[:300]

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return n / (time.perf_counter() - t), latencies


WRK_SCRIPT = """
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer TOKEN"
request = function()
  n = n + 1
  return wrk.format(nil, "/v1/jobs", nil, HEAD .. n .. MID .. n .. TAIL)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("FARM %d %d %.6f %.3f %.3f\\n", summary.requests,
    e.status + e.connect + e.read + e.write + e.timeout, summary.duration / 1e6,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3))
end
"""


def lua_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def wrk_round(
    url: str, token: str, clients: int, seconds: float, tmp: Path
) -> tuple[float, float, float]:
    """jobs/s, median and p99 latency (ms) of single submits from wrk's `clients` connections:
    the spec of `spec(n)`, n counting up in each of wrk's threads."""
    head, mid, tail = json.dumps(spec(7_777_777)).split("7777777")
    script = tmp / "post.lua"
    script.write_text(
        WRK_SCRIPT.replace("TOKEN", token)
        .replace("HEAD", lua_string(head))
        .replace("MID", lua_string(mid))
        .replace("TAIL", lua_string(tail))
    )
    cmd = ["wrk", "-t", str(min(2, clients)), "-c", str(clients), "-d", f"{seconds:g}s"]
    out = subprocess.run(
        [*cmd, "-s", str(script), url], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"^FARM (\d+) (\d+) ([\d.]+) ([\d.]+) ([\d.]+)$", out, re.M)
    assert m, out
    assert int(m[2]) == 0, out  # every answer a 201
    return int(m[1]) / float(m[3]), float(m[4]), float(m[5])


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--singles", type=int, default=2_000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="each wrk round's length")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-api-"))
    with RedisServer(tmp / "redis") as redis:
        settings = FarmSettings(redis_url=redis.url, storage=(tmp / "store").as_uri(), home=tmp)
        farm = Farm(settings)
        token = farm.tracker.tenants.create_token("bench", "bench", ["submit", "read"])[1]
        server = subprocess.Popen(
            [sys.executable, "-m", "farm", "serve", "--port", "0", "--no-webhooks"],
            env=settings_env(settings),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            url = server.stdout.readline().split()[2]
            sdk, batch, singles, med, tail = [], [], [], [], []
            wrk = shutil.which("wrk")
            w_rate, w_med, w_tail = [], [], []
            base = 0
            for r in range(args.rounds):
                sdk.append(sdk_round(farm, args.jobs, base))
                base += args.jobs
                batch.append(batch_round(url, token, args.jobs, base))
                base += args.jobs
                rate, lat = asyncio.run(singles_round(url, token, args.singles, args.clients, base))
                base += args.singles
                singles.append(rate)
                med.append(statistics.median(lat) * 1000)
                tail.append(p99(lat) * 1000)
                print(
                    f"round {r + 1}: sdk {sdk[-1]:,.0f} jobs/s  api batch {batch[-1]:,.0f} jobs/s "
                    f"(ratio {batch[-1] / sdk[-1]:.2f})  api singles {rate:,.0f} jobs/s, "
                    f"median {med[-1]:.1f} ms, p99 {tail[-1]:.1f} ms",
                    flush=True,
                )
                if wrk:
                    rate, w, t = wrk_round(url, token, args.clients, args.seconds, tmp)
                    w_rate.append(rate)
                    w_med.append(w)
                    w_tail.append(t)
                    print(
                        f"round {r + 1}: wrk singles x{args.clients} {rate:,.0f} jobs/s, "
                        f"median {w:.1f} ms, p99 {t:.1f} ms",
                        flush=True,
                    )
            m = statistics.median
            print(
                f"median: sdk submit_many {m(sdk):,.0f} jobs/s; POST /v1/jobs:batch {m(batch):,.0f} "
                f"jobs/s (API/SDK {m(batch) / m(sdk):.2f}); POST /v1/jobs x{args.clients} clients "
                f"{m(singles):,.0f} jobs/s, latency median {m(med):.1f} ms, p99 {m(tail):.1f} ms"
            )
            if wrk:
                print(
                    f"median: wrk POST /v1/jobs x{args.clients} connections {m(w_rate):,.0f} "
                    f"jobs/s, latency median {m(w_med):.1f} ms, p99 {m(w_tail):.1f} ms "
                    "(target p99 < 50 ms)"
                )
            else:
                print("wrk not on PATH (apt-get install wrk): only the Python clients measured")
        finally:
            server.terminate()
            server.wait(10)
            farm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
