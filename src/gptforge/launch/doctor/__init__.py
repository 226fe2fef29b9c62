"""`gptforge doctor`: check one node (and its peers) before a multi-node run.

Run it on every node with the same node flags as `gptforge launch`:

    gptforge doctor --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --iface eth0
    gptforge doctor --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --iface eth0

Each check prints PASS / WARN / FAIL (with the fix) or INFO; the exit code is 1 when anything FAILs.
Modules, one per concern: ``report`` (the PASS/WARN/FAIL lines), ``network`` (environment, interface,
master address and port), ``device`` (GPU and collective backend), ``peers`` (rendezvous with the
other nodes, clock skew), ``bench`` (timed all-reduce and matmul), ``advice`` (memory and gradient
accumulation for a preset), ``command`` (the order of the checks).
"""
