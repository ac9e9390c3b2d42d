"""How runs run: launch and rendezvous (`launch`; `rendezvous`: a file:// rendezvous used again), start-up
and the processes' agreement (`startup`), stop signals and the watchdog (`signals`), checkpoint files
(`checkpoint`), the run folder (`run_folder`: lock, kind, params.json, changed arguments, which flags are
operational), logs and statistics (`logs`), and the command line's one-line errors and exit statuses
(`cli`). Imports `src.method` and `src.data`, never the entry scripts."""
