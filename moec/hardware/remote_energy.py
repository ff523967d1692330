"""On-device energy sampling behind RPC: global functions the device server registers.

``moec.energy.start(spec_json) -> str`` starts a sampler *process* on the device (so it keeps
sampling while the RPC session's thread runs the timed loop in C++) and returns a handle
(empty string when the device has no meter); ``moec.energy.stop(handle) -> str`` ends it and
returns the reading as JSON ``{"joules", "seconds", "samples", "meters"}``. ``spec`` is
``{"sensors": [<preset power_sensors>], "root": "/", "period_s": 0.02}``.

Run as ``python -m moec.hardware.remote_energy SPEC_JSON``: the sampler process itself
(prints ``ready`` once sampling, then the reading when a line arrives on stdin).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

from moec.hardware.energy import Sampler, meters_for

_RUNNING: dict[str, subprocess.Popen] = {}


def _start(spec_json: str) -> str:
    spec = json.loads(spec_json)
    if not meters_for(spec.get("sensors", []), spec.get("root", "/")):
        return ""
    proc = subprocess.Popen([sys.executable, "-m", "moec.hardware.remote_energy", spec_json],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise RuntimeError(f"energy sampler did not start: {line!r}")
    handle = str(proc.pid)
    _RUNNING[handle] = proc
    return handle


def _stop(handle: str) -> str:
    proc = _RUNNING.pop(handle, None)
    if proc is None:
        raise RuntimeError(f"no energy sampler {handle!r} is running")
    out, _ = proc.communicate("stop\n", timeout=30)
    return out.strip().splitlines()[-1]


def register() -> None:
    """Register the sampler functions in this (RPC server) process."""
    import tvm

    tvm.register_global_func("moec.energy.start", _start, override=True)
    tvm.register_global_func("moec.energy.stop", _stop, override=True)


def _sampler_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    sampler = Sampler(meters_for(spec.get("sensors", []), spec.get("root", "/")),
                      float(spec.get("period_s", 0.02))).start()
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(asdict(sampler.stop())), flush=True)


if __name__ == "__main__":
    _sampler_main(sys.argv[1])
