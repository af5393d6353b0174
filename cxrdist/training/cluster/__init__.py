"""How the trainer's processes live on a cluster: the network interface they talk over (netif), the heartbeat that
notices a lost host, a peer's failure, preemption signals, elastic restarts, and the lock of one run per run directory."""
