"""RPC device server: the stock ``tvm.rpc.Server`` plus moec's on-device energy sampler functions.

Run on a device (it needs only TVM and this package)::

    python -m moec.hardware.rpc_device --tracker HOST:PORT --key jetson-orin

It is ``python -m tvm.exec.rpc_server`` with one addition, made through TVM's documented
``server_init_callback``: the global functions of :mod:`moec.hardware.remote_energy`
(``moec.energy.start`` / ``moec.energy.stop``), so the profiler can sample the device's own
power sensors in a thread on the device while the timed loop runs. A farm of plain stock
servers works too; it just reports modelled energy.
"""

from __future__ import annotations

import argparse
import logging


def _init_callback() -> None:
    from moec.hardware.remote_energy import register  # local: runs in the RPC server process (server_init_callback)
    register()


def main(argv: list[str] | None = None) -> None:
    import tvm.rpc

    p = argparse.ArgumentParser(prog="python -m moec.hardware.rpc_device")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--port-end", type=int, default=9199)
    p.add_argument("--tracker", required=True, help="HOST:PORT of the RPC tracker")
    p.add_argument("--key", required=True, help="device key the tracker hands out")
    p.add_argument("--custom-addr", default=None, help="address to report to the tracker")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    host, port = args.tracker.rsplit(":", 1)
    server = tvm.rpc.Server(args.host, args.port, args.port_end, tracker_addr=(host, int(port)), key=args.key,
                            custom_addr=args.custom_addr, silent=True, server_init_callback=_init_callback)
    server.proc.join()


if __name__ == "__main__":
    main()
