"""The dataplane: what touches the packet path, kept in the kernel.

The kernel forwards every packet; Python only configures it. `libmeshdp.so`
(built from `meshdp.c` by `make -C dataplane`, which `deploy/install.sh` runs)
applies nftables rules in-process through libnftables; `shim` binds it with
ctypes, and `policy` keeps a router's forwarding policy in the kernel, so a
service restart loses no state.
"""
