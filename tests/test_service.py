"""`p2psync service unit`: the systemd unit it prints runs the right command for
the right home as the right user, hardened, and systemd reads it as meant."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2psync import home as home_mod
from p2psync.cli import service
from p2psync.cli.main import cli
from tests.agents import SpawnedAgent, value_at, wait_for
from tests.agents import cli as run_cli
from tests.httpclient import Api


def unit(home: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        cli, ["--home", str(home), "service", "unit", "--executable", "/bin/true", *args]
    )
    return result.exit_code, result.stdout, result.stderr


def directives(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            name, _, value = line.partition("=")
            found[name] = value
    return found


def exec_words(value: str) -> list[str]:
    """ExecStart's words as systemd reads them (double-quoted, \\\\ and \\" escaped,
    $$ and %% for $ and %)."""
    words, i = [], 0
    while i < len(value):
        if value[i] == " ":
            i += 1
            continue
        assert value[i] == '"', value[i:]
        i += 1
        word = ""
        while value[i] != '"':
            if value[i] == "\\":
                i += 1
            word += value[i]
            i += 1
        i += 1
        words.append(word.replace("$$", "$").replace("%%", "%"))
    return words


def path_word(value: str) -> str:
    """A quoted path of ReadWritePaths as systemd reads it (escapes, %%; no $)."""
    assert value.startswith('"') and value.endswith('"'), value
    return re.sub(r"\\(.)", r"\1", value[1:-1]).replace("%%", "%")


@pytest.mark.pure
def test_the_agent_unit_runs_this_home_hardened(tmp_path: Path) -> None:
    home = tmp_path / "a home with %s and $HOME"
    home_mod.init(home, "a")
    code, text, err = unit(home, "--user", "root", "--listen", "0.0.0.0:7717",
                           "--http", "127.0.0.1:7718")
    assert code == 0, err
    found = directives(text)
    assert exec_words(found["ExecStart"]) == [
        "/bin/true", "--home", str(home.resolve()), "run", "--listen=0.0.0.0:7717",
        "--http=127.0.0.1:7718",
    ]
    assert path_word(found["ReadWritePaths"]) == str(home.resolve())
    assert found["User"] == "root" and found["ProtectSystem"] == "strict"
    assert found["NoNewPrivileges"] == "yes" and found["Restart"] == "on-failure"
    assert found["MemoryDenyWriteExecute"] == "yes"
    assert found["CapabilityBoundingSet"] == "" and "AmbientCapabilities" not in found
    assert "%%s" in found["Description"]
    assert "systemctl enable --now p2psync.service" in err


def nobodys_home(tmp_path: Path) -> Path:
    """An agent's home owned by nobody, whose own home is no user's files."""
    if os.geteuid() != 0:
        pytest.skip("giving a home to another user needs root")
    home = tmp_path / "a"
    home_mod.init(home, "a")
    for path in (home, *home.rglob("*")):
        os.chown(path, 65534, 65534)
    return home


@pytest.mark.pure
def test_no_users_files_are_seen_unless_the_service_needs_them(tmp_path: Path) -> None:
    home = nobodys_home(tmp_path)
    code, text, err = unit(home)  # as its owner, nobody (home: /nonexistent)
    assert code == 0, err
    assert directives(text)["User"] == "nobody"
    assert directives(text)["ProtectHome"] == "yes"
    code, text, err = unit(home, "--user", "root")  # root's own files are in /root
    assert code == 0, err
    assert directives(text)["ProtectHome"] == "read-only"


@pytest.mark.pure
def test_a_program_whose_python_is_in_a_users_files_keeps_them_readable(
    tmp_path: Path,
) -> None:
    home = nobodys_home(tmp_path)
    program = tmp_path / "p2psync"
    program.write_text("#!/home/someone/venv/bin/python\nimport p2psync\n")
    program.chmod(0o755)
    result = CliRunner().invoke(
        cli, ["--home", str(home), "service", "unit", "--executable", str(program)]
    )
    assert result.exit_code == 0, result.stderr
    assert directives(result.stdout)["ProtectHome"] == "read-only"


@pytest.mark.pure
def test_a_home_in_tmp_is_said_to_be_hidden_by_the_private_tmp(tmp_path: Path) -> None:
    if not tmp_path.resolve().is_relative_to("/tmp"):
        pytest.skip("the tests' temporary folders are not in /tmp here")
    home_mod.init(tmp_path / "a", "a")
    code, text, err = unit(tmp_path / "a", "--user", "root")
    assert code == 0 and text, err
    assert f"warning: {(tmp_path / 'a').resolve()} is in a temporary folder" in err
    assert "/bin/true is in" not in err  # the program is not


@pytest.mark.pure
def test_a_port_below_1024_gets_that_capability_alone(tmp_path: Path) -> None:
    home_mod.init(tmp_path / "a", "a")
    code, text, err = unit(tmp_path / "a", "--user", "root", "--listen", "0.0.0.0:443")
    assert code == 0, err
    found = directives(text)
    assert found["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert found["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"


@pytest.mark.pure
def test_the_relay_unit_runs_relay_serve(tmp_path: Path) -> None:
    home = tmp_path / "relay"
    result = CliRunner().invoke(cli, ["relay", "init", "--home", str(home)])
    assert result.exit_code == 0, result.output
    code, text, err = unit(home, "--relay", "--user", "root", "--listen", "0.0.0.0:7720",
                           "--advertise", "relay.example.org:7720")
    assert code == 0, err
    words = exec_words(directives(text)["ExecStart"])
    assert words[1:] == ["--home", str(home.resolve()), "relay", "serve",
                         "--listen=0.0.0.0:7720", "--advertise=relay.example.org:7720"]
    assert "p2psync-relay.service" in err


@pytest.mark.pure
@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        ((), 2, "belongs to root"),  # tests run as root: the home is root's
        (("--user", "no-such-user-here"), 2, "no user"),
        (("--user", "root", "--listen", "nowhere"), 2, ""),
        (("--user", "nobody"), 2, "belongs to root"),  # it could not read the home
        (("--user", "root", "--http", "1:2", "--no-http"), 2, "not both"),
        (("--user", "root", "--advertise", "x.example:1"), 2, "--relay"),
    ],
)
def test_what_cannot_make_a_sound_unit_is_refused(
    tmp_path: Path, args: tuple[str, ...], code: int, words: str
) -> None:
    home_mod.init(tmp_path / "a", "a")
    got, text, err = unit(tmp_path / "a", *args)
    assert got == code and text == "", (got, text, err)
    assert words in err and "Traceback" not in err


@pytest.mark.pure
def test_a_home_of_a_uid_with_no_user_is_refused_in_a_sentence(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a home to another uid needs root")
    home = tmp_path / "a"
    home_mod.init(home, "a")
    os.chown(home, 54321, 54321)  # no user, no group of that number here
    code, text, err = unit(home)
    assert code == 2 and text == "", (code, text, err)
    assert "uid 54321, which is no user" in err and "Traceback" not in err
    assert "or pass --user root" in err  # (which tests/test_review2.py shows works)


@pytest.mark.pure
def test_a_group_with_no_name_is_given_by_its_number() -> None:
    assert service._group(0) == "root"
    assert service._group(54321) == "54321"  # Group= takes a GID as well


@pytest.mark.pure
def test_a_folder_that_is_not_a_home_is_refused(tmp_path: Path) -> None:
    code, text, err = unit(tmp_path / "nothing", "--user", "root")
    assert code == 1 and text == "" and "p2psync init" in err


@pytest.mark.process
def test_systemd_reads_the_unit_as_written(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the systemd package)")
    home = tmp_path / "odd home %n $USER \\ \"q\""
    home_mod.init(home, "a")
    code, text, err = unit(home, "--user", "root")
    assert code == 0, err
    path = tmp_path / "p2psync.service"
    path.write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(path)], check=False, capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


NOWX = Path(__file__).with_name("nowx.py")


def without_wx_memory(*command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``command`` under the seccomp filter of MemoryDenyWriteExecute=yes."""
    result = subprocess.run(
        [sys.executable, str(NOWX), *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode == 3 and result.stderr.startswith("nowx:"):
        pytest.skip(result.stderr.strip())
    return result


@pytest.mark.process
def test_the_filter_standing_in_for_memory_deny_write_execute_refuses_wx_memory() -> None:
    """The stand-in is real: W+X memory is refused under it, W and X apart are not."""
    wx = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)"
    result = without_wx_memory(sys.executable, "-c", wx)
    assert result.returncode == 1 and "PermissionError" in result.stderr, result
    assert subprocess.run([sys.executable, "-c", wx], check=False).returncode == 0
    w = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE)"
    assert without_wx_memory(sys.executable, "-c", w).returncode == 0


@pytest.mark.process
def test_the_agent_serves_its_api_and_console_without_wx_memory(tmp_path: Path) -> None:
    """The agent's unit says MemoryDenyWriteExecute=yes: an agent started under the
    same filter (HTTP API, console, discovery on 127.0.0.1) serves, and stops
    cleanly; a peer syncs with it."""
    if not NOWX.exists():
        pytest.skip("tests/nowx.py is missing")
    probe = without_wx_memory("true")
    assert probe.returncode == 0, probe.stderr
    hq = SpawnedAgent(tmp_path / "hq", "hq").init()
    hq.prefix = [sys.executable, str(NOWX)]
    hq.args = ["--discovery-interface", "127.0.0.1"]
    branch = SpawnedAgent(tmp_path / "branch", "branch").init()
    hq.start("--http", "127.0.0.1:0")
    try:
        branch.start()
        try:
            hq.pair(branch)
            branch.pair(hq)
            run_cli(branch.home, "put", "stock", "A-1", '{"qty": 4}')
            wait_for(lambda: value_at(hq, "stock", "A-1") == {"qty": 4}, timeout=20)
        finally:
            branch.stop()
        assert hq.http_url is not None
        api = Api.of(hq.http_url, hq.home)
        assert api.ok("GET", "/records/stock/A-1")["value"] == {"qty": 4}
        assert api.ok("PUT", "/records/stock/A-2", {"qty": 1})
        link = run_cli(hq.home, "console").strip()
        page = Api(hq.http_url, None).call("GET", link[len(hq.http_url) :])
        assert page.status in (200, 303), page
    finally:
        code = hq.stop()
    assert code == 0, (tmp_path / "hq.log").read_text()[-2000:]


@pytest.mark.process
@pytest.mark.slow
def test_the_demo_runs_without_wx_memory() -> None:
    """Agents syncing directly and through a relay node, bundles, the HTTP API:
    ``p2psync demo`` under the filter does all it does without."""
    result = without_wx_memory(sys.executable, "-m", "p2psync", "demo", timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Done: all agents stopped" in result.stdout
