"""One optimizer step's machinery: the guarded step under mixed precision (optimizer_step), the bad-step rules
(bad_steps), device-side counters between log lines (counters) and the masked mean gathered across ranks (global_mean)."""
