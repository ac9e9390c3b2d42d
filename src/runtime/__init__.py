"""How runs run: launch and rendezvous (`launch`; `rendezvous`: a file:// rendezvous used again), start-up
and the processes' agreement (`startup`), stop signals and the watchdog (`signals`), files written whole
(`files`), checkpoint files (`checkpoint`), the run folder (`run_folder`: lock, kind, params.json, changed
arguments), logs and statistics (`logs`), the command line's flags, one-line errors and exit statuses
(`cli`), durations as printed (`durations`), and how an entry script ends (`exits`). `files`, `cli` and
`durations` use the standard library only, so that the tools start without torch. Imports `src.method` and
`src.data`, never the entry scripts."""
