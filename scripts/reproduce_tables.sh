#!/usr/bin/env bash
# Reproduce the published tables in one command: every cell (data set x method x pretraining epochs
# x seed) is one run of script_unmix_c10.sh / script_unmix_c100.sh (pretraining, then linear
# evaluation) in its own folder <experiments>/<c10|c100>_<swav|unmix>_<E>ep_seed<S>, then
# tools/results.py writes <report>/results.md (ours as mean ± std over seeds next to the published
# numbers, every cell's status, per-run rows) and plots.
#
#   bash scripts/reproduce_tables.sh                      the 20 published cells, seed 31
#   bash scripts/reproduce_tables.sh --seeds 31,32,33     the same with 3 seeds (error bars)
#   bash scripts/reproduce_tables.sh --status             done / running / pending / failed / interrupted / missing
#
# OPTIONS
#   --datasets c10,c100  --methods swav,unmix  --epochs 200,400,600,800,1000  --seeds 31
#   --experiments DIR    cells' folders (default experiments/tables; book-keeping in DIR/_cells)
#   --report DIR         report folder (default report/tables)
#   --dry-run            print the cells and what would run; submit and run nothing
#   --status             print each cell's status
#   --local              run the cells here even where sbatch exists
#
# WHERE IT RUNS
#   With sbatch: one job array (scripts/table_cell.sh, the SBATCH scripts' resources: 1 GPU, 12 h,
#   requeue on preemption per array task) holds the cells to run, and a report job runs tools/results.py
#   once every task has ended (afterany). Without sbatch, or with --local: the cells run here one after
#   another, then the report. Running the command again skips finished cells, resumes interrupted or
#   failed ones and leaves queued or running ones alone (its report job also waits for those). A cell
#   records the settings and data it was started with (_cells/<cell>.settings); run again with other ones
#   (EXTRA_ARGS, EVAL_EXTRA_ARGS, BATCH_SIZE, ARCH, EVAL_EPOCHS, AUGMENT, WORKERS, SEMISUP_LABELS,
#   SEMISUP_EXTRA_ARGS, DEVICE, the processes: through sbatch the --nodes/--ntasks/--ntasks-per-node of
#   SBATCH_ARGS, here NPROC or else the visible GPUs; any byte of the data), the command stops with one
#   line naming the difference: use another --experiments folder for other settings. Cells recorded by an
#   earlier version are checked on what they recorded (one line says so).
#
# ENVIRONMENT (passed to every cell as script_unmix_c10.sh defines them)
#   DATASET_PATH         data of every cell; a folder holding both cifar-10-batches-py/ and
#                        cifar-100-python/ serves both data sets. DATASET_PATH_C10, DATASET_PATH_C100:
#                        per data set. Default: the keywords cifar10 / cifar100 (downloaded once, before
#                        the cells start, into data/ of the current folder)
#   BATCH_SIZE ARCH WORKERS AUGMENT DEVICE EVAL_EPOCHS EXTRA_ARGS EVAL_EXTRA_ARGS SEMISUP_LABELS SEMISUP_EXTRA_ARGS NPROC PYTHON
#                        as in script_unmix_c10.sh
#                        (EVAL_EXTRA_ARGS="--probe cached": evaluation folders <cell>_linear_eval_cached)
#   EPOCHS RUN_SWAV EXPERIMENT_PATH, and --seed/--epochs/--run_swav/--dump_path/--data_path in
#                        EXTRA_ARGS: set per cell, refused here
#   SBATCH_ARGS          extra sbatch options for the job array (e.g. "-p gpu --time=24:00:00")
#   REPORT_SBATCH_ARGS   extra sbatch options for the report job (e.g. "-p cpu")
#
# EXIT STATUS
#   0 submitted / every cell done here / dry run / status; 1 some cell failed here (the report still
#   lists every cell); 2 bad input (one line on stderr: unknown data set or method, epochs <= 0, a data
#   path lacking a data set, a per-cell setting in the environment, a started cell with other settings,
#   sbatch refused the job, squeue failed so that queued cells could not be told from interrupted ones)

set -uo pipefail
CODE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
exec "$PYTHON" "$CODE_DIR/tools/reproduce_tables.py" "$@"
