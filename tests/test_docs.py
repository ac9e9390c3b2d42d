"""The docs are true to the code: every command that README.md and docs/*.md show names only flags its
script's parser has and environment variables its script reads (a command dated "as of commit X": those of
that commit), every flag, repository path, link, anchor and test they name exists, and every flag of the
three entry scripts is documented. No command runs."""
import ast
import re
import shlex
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

import eval_linear
import eval_semisup
import main_swav_unmix

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ENTRY_PARSERS = {"main_swav_unmix.py": main_swav_unmix.get_parser, "eval_linear.py": eval_linear.get_parser,
                 "eval_semisup.py": eval_semisup.get_parser}
# Shell scripts whose arguments go on to a Python script's parser (besides their own --help / -h).
FORWARDS = {"script_unmix_c10.sh": "main_swav_unmix.py", "script_unmix_c100.sh": "main_swav_unmix.py",
            "scripts/reproduce_tables.sh": "tools/reproduce_tables.py"}
# The scripts' variables that carry flags of an entry script.
FLAG_VARIABLES = {"EXTRA_ARGS": "main_swav_unmix.py", "EVAL_EXTRA_ARGS": "eval_linear.py",
                  "SEMISUP_EXTRA_ARGS": "eval_semisup.py"}
# Read by torch, oneDNN or the shell, not by this repository.
EXTERNAL_VARIABLES = {"CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "PATH"}
LAUNCHERS = {"python", "python3", "bash", "sh", "sbatch", "srun", "torchrun", "exec", "time"}
# Paths that name the released repository's files (docs/released-behaviour.md describes that code).
RELEASED_FILES = {"src/resnet50.py", "src/utils.py"}
FLAG = re.compile(r"^--?[A-Za-z][\w-]*(=.*)?$")
PLACEHOLDER = re.compile(r"[$<>{}]|\.\.\.|^[A-Z][A-Z_]*$")


def _doc_text(path):
    return path.read_text(encoding="utf-8")


def _without_fences(text):
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _inline_spans(text):
    return [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", _without_fences(text))]


def _shell_words(snippet):
    """The commands of a shell snippet as lists of words: continuation lines joined, a newline outside
    quotes ends a command, comments dropped, `&&`, `;` and `|` separate commands."""
    out, quote, i = [], None, 0
    while i < len(snippet):
        c = snippet[i]
        if c == "\\" and snippet[i + 1:i + 2] == "\n" and quote is None:
            out.append(" ")
            i += 2
            continue
        if c == "#" and quote is None and (not out or out[-1] in " \t\n"):
            while i < len(snippet) and snippet[i] != "\n":
                i += 1
            continue
        if c in "'\"" and quote in (None, c):
            quote = None if quote else c
        out.append(" ; " if c == "\n" and quote is None else c)
        i += 1
    lexer = shlex.shlex("".join(out), posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, ""
    commands, current = [], []
    for word in lexer:
        if word and set(word) <= set(";&|"):
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [c for c in commands + [current] if c]


HISTORICAL = re.compile(r"as\s+of\s+commit\s+([0-9a-f]{7,40})\b")


@lru_cache(maxsize=None)
def _read(path, commit=None):
    """A repository file's text, today's or at a commit (None where it does not exist or git has no history)."""
    if commit is None:
        return (REPO / path).read_text() if (REPO / path).is_file() else None
    try:
        out = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, capture_output=True, text=True)
    except OSError:  # no git
        return None
    return out.stdout if out.returncode == 0 else None


def _repo_script(word):
    name = word[2:] if word.startswith("./") else word
    return name if name.endswith((".py", ".sh")) and (REPO / name).is_file() else None


def _split_command(words):
    """(environment assignments, the repository script it runs or None, the words after the script)."""
    env = {}
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        name, value = words[0].split("=", 1)
        env[name] = value
        words = words[1:]
    for i, word in enumerate(words):
        if i and words[i - 1] == "-m" and word not in ("torch.distributed.run", "torch.distributed.launch"):
            break  # python -m pytest tests/test_x.py ...: the words are pytest's
        script = _repo_script(word)
        if script:
            return env, script, words[i + 1:]
        if word not in LAUNCHERS and not word.startswith("-") and "=" not in word and i == 0:
            break  # not a command of ours (pytest, tar, pip, ...)
    return env, None, words


@lru_cache(maxsize=None)
def _options(script, commit=None):
    """Every option string the script accepts (today or at a commit): its own parser's, for a Python
    script; for a shell script the Python parser it forwards to plus the options its `case` patterns name."""
    if script in ENTRY_PARSERS and commit is None:
        return frozenset(_entry_parser(script)._option_string_actions)
    text = _read(script, commit)
    if script.endswith(".py"):
        found = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                found |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
        return frozenset(found | {"-h", "--help"})
    patterns = set(re.findall(r"(?m)^\s*([-\w|]*-[-\w|]*)\)", text))
    own = {opt for p in patterns for opt in p.split("|") if opt.startswith("-")}
    return frozenset(own | {"-h", "--help"} | (_options(FORWARDS[script], commit) if script in FORWARDS else set()))


@lru_cache(maxsize=None)
def _entry_parser(script):
    return ENTRY_PARSERS[script]()


def _choices(script, option):
    if script not in ENTRY_PARSERS:
        return None
    action = _entry_parser(script)._option_string_actions.get(option)
    return action.choices if action is not None else None


@lru_cache(maxsize=None)
def _closure_text(script, commit=None):
    return _code_closure(script, commit, set())


def _code_closure(script, commit, seen):
    """The text of a script and of every repository script or module it runs or imports."""
    text = _read(script, commit) if script not in seen else None
    if text is None:
        return ""
    seen.add(script)
    called = set(re.findall(r"((?:scripts|tools|benchmarks|src)/[\w/]+\.(?:py|sh)|\bmain_swav_unmix\.py|"
                            r"\beval_linear\.py|\beval_semisup\.py)", text))
    folder = str(Path(script).parent)
    for module in re.findall(r"^(?:from|import) ([\w.]+)", text, re.M):
        dotted = module.replace(".", "/") + ".py"
        called |= {p for p in (dotted, f"{folder}/{dotted}") if _read(p, commit) is not None}
    return text + "".join(_code_closure(c, commit, seen) for c in sorted(called))


def _reads_variable(script, name, commit=None):
    text = _closure_text(script, commit)
    return bool(re.search(rf"\$\{{?{name}\b|[\"']{name}[\"']|\b{name}=\$\{{", text))


def _check_flags(script, words, where, commit=None):
    problems = []
    options = _options(script, commit)
    for i, word in enumerate(words):
        if word == "--":
            break  # what follows goes to another program
        if not FLAG.match(word) or PLACEHOLDER.search(word.split("=")[0]):
            continue
        option, _, inline_value = word.partition("=")
        if option not in options:
            problems.append(f"{where}: {script} has no option {option}")
            continue
        value = inline_value or (words[i + 1] if i + 1 < len(words) else "")
        choices = _choices(script, option) if commit is None else None
        if choices and value and not PLACEHOLDER.search(value) and not value.startswith("-") and value not in choices:
            problems.append(f"{where}: {script} {option} {value}: not one of {sorted(choices)}")
    return problems


def _check_command(words, where, commit=None):
    """What is wrong with one command; a command the docs give as run at an earlier commit is checked
    against the scripts of that commit (not at all where git has no such history, as in a shallow clone)."""
    env, script, rest = _split_command(words)
    if commit is not None and script and _read(script, commit) is None:
        return []
    problems = []
    for name, value in env.items():
        if name in FLAG_VARIABLES:
            problems += _check_flags(FLAG_VARIABLES[name], value.split(), f"{where} ({name})", commit)
        if script and name not in EXTERNAL_VARIABLES and not _reads_variable(script, name, commit):
            problems.append(f"{where}: {script}{f' at {commit}' if commit else ''} does not read {name}")
    if script:
        problems += _check_flags(script, rest, where, commit)
    return problems


def _snippets(text):
    """(shell snippet, the commit it was run at where the text just before a block or just after a span
    says "as of commit <hash>", else None)."""
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) in ("", "bash", "sh", "shell", "console"):
            found = HISTORICAL.findall(text[max(0, m.start() - 300):m.start()])
            yield m.group(2), found[-1] if found else None
    prose = _without_fences(text)
    for m in re.finditer(r"`([^`]+)`", prose):
        found = HISTORICAL.search(prose[m.end():m.end() + 120])
        yield m.group(1).replace("\n", " "), found.group(1) if found else None


def _doc_commands():
    """(where, words, commit) of every command in the docs' shell blocks and inline code spans."""
    for doc in DOCS:
        for snippet, commit in _snippets(_doc_text(doc)):
            try:
                commands = _shell_words(snippet)
            except ValueError:  # prose in backticks with an apostrophe
                continue
            for words in commands:
                yield f"{doc.relative_to(REPO)}: `{' '.join(words)[:90]}`", words, commit


def test_the_docs_show_commands_of_every_kind():
    """The parsing finds what it checks (a parser that finds nothing passes everything)."""
    scripts = {_split_command(words)[1] for _, words, _ in _doc_commands()}
    assert {"main_swav_unmix.py", "eval_linear.py", "eval_semisup.py", "script_unmix_c10.sh",
            "scripts/reproduce_tables.sh", "tools/results.py", "tools/export_backbone.py",
            "benchmarks/bench_train_step.py", "benchmarks/gpu_check.sh"} <= scripts


def test_every_command_in_the_docs_names_real_flags_and_variables():
    problems = [p for where, words, commit in _doc_commands() for p in _check_command(words, where, commit)]
    assert not problems, "\n".join(problems)


def _path_candidates(text):
    """Repository paths in backticks and link targets (without anchors)."""
    for span in _inline_spans(text):
        for word in span.split():
            yield word.strip(",;:()")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"^(https?:|mailto:|#)", target):
            yield target.split("#")[0]


def _missing_path(doc, word):
    word = word.split("::")[0]
    word = word[2:] if word.startswith("./") else word
    top_level = {p.name for p in REPO.iterdir()} - {"experiments", "report", "data", "local_data"}
    if "/" not in word:
        if word.endswith((".py", ".sh")) and not PLACEHOLDER.search(word) and "*" not in word:
            if not any(REPO.rglob(word)):
                return f"{doc.name}: `{word}` is no file of the repository"
        return None
    if word in RELEASED_FILES and doc.name == "released-behaviour.md":
        return None
    prefix = re.split(r"[<{]|\.\.\.|\$", word)[0].rstrip("/")
    first = prefix.split("/")[0]
    if first == "..":
        resolved = (doc.parent / prefix).resolve()
    elif first in top_level:
        resolved = REPO / prefix
    elif first and doc.parent != REPO and (doc.parent / first).exists():
        resolved = doc.parent / prefix  # a link relative to docs/
    else:
        return None  # a folder that runs make, or one outside the repository
    if "*" in prefix:
        return None if list(REPO.glob(str(resolved.relative_to(REPO)))) else f"{doc.name}: `{word}` matches nothing"
    module, _, attribute = prefix.rpartition(".")
    if not resolved.exists() and "/" in module and (REPO / f"{module}.py").is_file():  # src/x/module.name
        return None if re.search(rf"\b{attribute}\b", (REPO / f"{module}.py").read_text()) else \
            f"{doc.name}: `{word}`: {module}.py has no {attribute}"
    return None if resolved.exists() else f"{doc.name}: `{word}` does not exist"


def test_every_repository_path_the_docs_name_exists():
    problems = {m for doc in DOCS for w in _path_candidates(_doc_text(doc)) if (m := _missing_path(doc, w))}
    assert not problems, "\n".join(sorted(problems))


def _anchors(text):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", _without_fences(text), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower().replace("`", "")).replace(" ", "-") for h in headings}


def test_every_link_anchor_exists():
    problems = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]*#[^)\s]+)\)", _doc_text(doc)):
            if target.startswith("http"):
                continue
            page, anchor = target.split("#", 1)
            linked = (doc.parent / page) if page else doc
            if linked.is_file() and anchor not in _anchors(_doc_text(linked)):
                problems.append(f"{doc.name}: link {target}: no such heading in {linked.name}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("script", sorted(ENTRY_PARSERS))
def test_every_flag_of_the_entry_scripts_is_documented(script):
    """tests/test_flags.py pins the released flags' names and defaults; this checks that every flag,
    new or released, is described in docs/flags.md or docs/released-behaviour.md."""
    docs = _doc_text(REPO / "docs" / "flags.md") + _doc_text(REPO / "docs" / "released-behaviour.md")
    undocumented = [o for a in ENTRY_PARSERS[script]()._actions for o in a.option_strings[:1]
                    if o not in ("-h",) and not re.search(rf"`{o}[`= ,]|{o}\b", docs)]
    assert not undocumented, f"{script}: not in docs/flags.md nor docs/released-behaviour.md: {undocumented}"


@pytest.mark.parametrize("snippet,expected", [
    ('A=1 B="x y" \\\n  bash s.sh --k v   # note\nnext', [["A=1", "B=x y", "bash", "s.sh", "--k", "v"], ["next"]]),
    ("a && b; c | d", [["a"], ["b"], ["c"], ["d"]]),
    ("X='one\n  two' cmd", [["X=one\n  two", "cmd"]]),
])
def test_shell_words(snippet, expected):
    assert _shell_words(snippet) == expected


def test_the_checks_catch_a_wrong_flag_a_wrong_variable_and_a_wrong_value():
    assert _check_command(["python", "eval_linear.py", "--no_such_flag", "1"], "x")
    assert _check_command(["EPOCHZ=2", "bash", "script_unmix_c10.sh"], "x")
    assert _check_command(["EVAL_EXTRA_ARGS=--probe cachd", "bash", "script_unmix_c10.sh"], "x")
    assert _check_command(["python", "tools/results.py", "experiments/", "--outt", "r"], "x")
    assert not _check_command(["python", "-m", "pytest", "-q", "tests/test_resume.py", "-k", "x"], "x")
    assert _check_command(["python", "-m", "torch.distributed.run", "--nproc_per_node=2", "main_swav_unmix.py",
                           "--epochz", "1"], "x")
    assert not _check_command(["EPOCHS=2", "EXTRA_ARGS=--width_per_group 8", "bash", "script_unmix_c10.sh",
                               "--epochs", "200"], "x")


def _shown(default):
    return " ".join(map(str, default)) if isinstance(default, list) else "''" if default == "" else str(default)


def test_the_released_flags_tables_show_the_parsers_defaults():
    text = _doc_text(REPO / "docs" / "released-behaviour.md")
    tables = re.findall(r"^`(\w+\.py)`[^\n]*:\n\n\| flag \| default \| what \|\n\|---\|---\|---\|\n((?:\|.*\n)+)", text, re.M)
    assert sorted(script for script, _ in tables) == sorted(ENTRY_PARSERS)
    for script, rows in tables:
        actions = _entry_parser(script)._option_string_actions
        for option, default in re.findall(r"^\| `(--\w+)` \| ([^|]*) \|", rows, re.M):
            assert option in actions, f"{script} has no {option}"
            assert default.strip() == _shown(actions[option].default), f"{script} {option}: {default.strip()}"


def test_a_command_run_at_an_earlier_commit_is_checked_against_that_commit():
    if _read("benchmarks/gpu_check.sh", "2150868") is None:
        pytest.skip("no git history here (a shallow clone)")
    command = ["TRAIN_SECONDS=100", "bash", "benchmarks/gpu_check.sh"]
    assert not _check_command(command, "x", "2150868") and _check_command(command, "x")
    assert _check_command(["TRAIN_SECONDZ=100", "bash", "benchmarks/gpu_check.sh"], "x", "2150868")
    assert list(_snippets("the script as of commit\n2150868: `TRAIN_SECONDS=1 bash benchmarks/gpu_check.sh`")) == [
        ("TRAIN_SECONDS=1 bash benchmarks/gpu_check.sh", None)]  # the hash comes after the command it dates
    assert list(_snippets("`bash benchmarks/gpu_check.sh` (as of commit 2150868)"))[0][1] == "2150868"


def test_anchors_are_githubs():
    assert _anchors("## `torch.hub`\n## The first GPU check (the loop before the GPU-ready iteration)\n") == {
        "torchhub", "the-first-gpu-check-the-loop-before-the-gpu-ready-iteration"}
    assert _missing_path(REPO / "docs" / "x.md", "tests/data/no_such_fixture")
    assert _missing_path(REPO / "docs" / "x.md", "src/runtime/run_folder.NO_SUCH_NAME")
    assert not _missing_path(REPO / "docs" / "x.md", "src/runtime/cli.OPERATIONAL_FLAGS")


# Options of other programs that the docs name: sbatch, torchrun, pytest(-xdist), pip, tensorboard; and
# `--batch`, running.md's example of an abbreviation the scripts refuse.
OTHER_PROGRAMS_OPTIONS = {"--cpus-per-task", "--gres", "--nodes", "--ntasks", "--ntasks-per-node", "--partition",
                          "--signal", "--nproc_per_node", "--dist", "--maxprocesses", "--index-url", "--logdir",
                          "--batch"}


def test_every_flag_named_in_the_docs_prose_exists():
    """A flag named alone in backticks (`--knn_freq`) is an option of a script of the repository."""
    scripts = [str(p.relative_to(REPO)) for pattern in ("*.py", "*.sh", "tools/*.py", "benchmarks/*.py",
                                                         "benchmarks/*.sh", "scripts/*.sh") for p in REPO.glob(pattern)]
    known = set().union(*(_options(s) for s in scripts if s != "setup.sh")) | OTHER_PROGRAMS_OPTIONS
    unknown = {f"{doc.name}: {flag}" for doc in DOCS for span in _inline_spans(_doc_text(doc))
               for flag in re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", span) if flag not in known}
    assert not unknown, "\n".join(sorted(unknown))


def test_every_test_the_docs_name_exists():
    """`tests/test_x.py::test_name` anywhere in the docs (commands included) names a test of that file."""
    named = {m for doc in DOCS for m in re.findall(r"(tests/test_\w+\.py)::(\w+)", _doc_text(doc))}
    assert named, "the docs name no single test: the pattern is stale"
    missing = [f"{f}::{t}" for f, t in sorted(named)
               if not re.search(rf"^(async )?def {t}\(", _read(f) or "", re.M)]
    assert not missing, missing


def test_every_test_function_the_docs_name_exists():
    """A test named alone in backticks (`test_larc_step_on_released_noise_gradients`) is one of tests/ (or, like
    `test_images`, a key the code writes)."""
    code = "".join(p.read_text() for pattern in ("tests/*.py", "src/**/*.py", "*.py") for p in REPO.glob(pattern))
    named = {t for doc in DOCS for t in re.findall(r"`(test_\w+)(?:\[[^\]`]*\])?`", _doc_text(doc))}
    missing = sorted(t for t in named if not re.search(rf"def {t}\(|[\"']{t}[\"']", code))
    assert named and not missing, missing
