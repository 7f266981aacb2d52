"""Pure parts of swarmnet.runtime: backoff, tasks.json round trip, hosts rendering,
exec_argv, /proc parsing, exit reasons. No root, no processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmnet.runtime import (
    PersistedTask,
    RuntimeConfig,
    RuntimeConfigError,
    TaskSpec,
    TaskSpecError,
    decode_state,
    encode_state,
    exec_argv,
    render_hosts,
    restart_delay,
)
from swarmnet.runtime.supervisor import (
    DEFAULT_PATH,
    enter_argv,
    exit_reason,
    first_error_line,
    parse_stat,
    task_env,
)


def spec(**kw) -> TaskSpec:
    base = dict(
        task_id="t1abc",
        name="web.1",
        netns="sn-t1abc",
        argv=("sh", "-c", "sleep 1000"),
        env=(("SWARMNET_TASK_NAME", "web.1"), ("SWARMNET_SERVICE_NAME", "web")),
    )
    base.update(kw)
    return TaskSpec(**base)


# ---- backoff ----------------------------------------------------------------------------


def test_backoff_doubles_from_initial_to_cap():
    cfg = RuntimeConfig()
    assert [restart_delay(cfg, n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_backoff_custom_and_huge_failure_counts():
    cfg = RuntimeConfig(restart_delay_s=0.1, restart_delay_max_s=0.3)
    assert restart_delay(cfg, 1) == 0.1
    assert restart_delay(cfg, 2) == 0.2
    assert restart_delay(cfg, 3) == 0.3
    assert restart_delay(cfg, 10**6) == 0.3  # no float overflow


@given(st.integers(min_value=1, max_value=10_000))
def test_backoff_is_monotonic_and_bounded(n):
    cfg = RuntimeConfig()
    assert cfg.restart_delay_s <= restart_delay(cfg, n) <= cfg.restart_delay_max_s
    assert restart_delay(cfg, n) <= restart_delay(cfg, n + 1)


def test_config_defaults_and_validation():
    cfg = RuntimeConfig()
    assert cfg.stop_timeout_s == 10.0  # docker's default
    cfg.validate()
    with pytest.raises(RuntimeConfigError):
        RuntimeConfig(restart_delay_s=5, restart_delay_max_s=1).validate()
    with pytest.raises(RuntimeConfigError):
        RuntimeConfig(kill_timeout_s=0).validate()


# ---- tasks.json -------------------------------------------------------------------------


def test_state_round_trip():
    tasks = {
        "t1abc": PersistedTask(spec=spec(), pid=1234, start_ticks=987654),
        "t2def": PersistedTask(
            spec=spec(task_id="t2def", name="web.2", hosts=(("10.0.1.5", "web.2"),)),
            pid=None,
            start_ticks=None,
        ),
    }
    data = encode_state(tasks)
    assert json.loads(data)["version"] == 1
    assert decode_state(data) == tasks


def test_state_empty_round_trip():
    assert decode_state(encode_state({})) == {}


@pytest.mark.parametrize(
    "doc",
    [
        {"version": 99, "tasks": {}},
        {"tasks": {}},
        {"version": 1, "tasks": {"other": {"pid": 1, "start_ticks": 1, "spec": spec().to_json()}}},
        {"version": 1, "tasks": {"t1abc": {"pid": 1}}},
    ],
)
def test_state_rejects_malformed(doc):
    with pytest.raises((ValueError, KeyError, TypeError)):
        decode_state(json.dumps(doc).encode())


# ---- TaskSpec and hosts -----------------------------------------------------------------


def test_hosts_rendering():
    text = render_hosts(spec(hosts=(("10.0.1.5", "web.1"), ("10.0.1.2", "db"))))
    lines = text.splitlines()
    assert lines[0].split() == ["127.0.0.1", "localhost"]
    assert lines[1].split()[:2] == ["::1", "localhost"]
    assert lines[2:] == ["10.0.1.5\tweb.1", "10.0.1.2\tdb"]
    assert text.endswith("\n")


def test_hosts_rendering_without_extra_lines():
    assert len(render_hosts(spec()).splitlines()) == 2


@pytest.mark.parametrize(
    "kw",
    [
        {"task_id": "../etc"},
        {"task_id": ""},
        {"task_id": "a/b"},
        {"name": ""},
        {"name": "x" * 65},
        {"name": "has space"},
        {"netns": "a/b"},
        {"argv": ()},
        {"hosts": (("10.0.0.1", "evil\n1.2.3.4 bank"),)},
    ],
)
def test_taskspec_rejects_bad_values(kw):
    with pytest.raises(TaskSpecError):
        spec(**kw)


# ---- launcher command line and environment ---------------------------------------------


def test_enter_argv():
    argv = enter_argv("/py", spec(), Path("/s/t1abc/resolv.conf"), Path("/s/t1abc/hosts"))
    assert argv == [
        "/py",
        "-m",
        "swarmnet.runtime.enter",
        "--netns",
        "sn-t1abc",
        "--hostname",
        "web.1",
        "--resolv",
        "/s/t1abc/resolv.conf",
        "--hosts",
        "/s/t1abc/hosts",
        "--",
        "sh",
        "-c",
        "sleep 1000",
    ]


def test_task_env_adds_path_and_lab_id_only():
    env = task_env(spec(), {"SWARMNET_LAB_ID": "lab1", "HOME": "/root", "PATH": "/agent"})
    assert env == {
        "SWARMNET_TASK_NAME": "web.1",
        "SWARMNET_SERVICE_NAME": "web",
        "PATH": DEFAULT_PATH,
        "SWARMNET_LAB_ID": "lab1",
    }
    own = task_env(spec(env=(("PATH", "/opt/bin"),)), {})
    assert own == {"PATH": "/opt/bin"}


# ---- exec_argv --------------------------------------------------------------------------


def test_exec_argv():
    assert exec_argv(4242, ["hostname"]) == [
        "nsenter",
        "-t",
        "4242",
        "-n",
        "-u",
        "-m",
        "--",
        "hostname",
    ]
    assert exec_argv(7, ["sh", "-c", "echo -n x"])[-3:] == ["sh", "-c", "echo -n x"]


@pytest.mark.parametrize("pid,argv", [(0, ["x"]), (-1, ["x"]), (5, [])])
def test_exec_argv_rejects(pid, argv):
    with pytest.raises(ValueError):
        exec_argv(pid, argv)


# ---- /proc and exit parsing -------------------------------------------------------------


def test_parse_stat_survives_odd_command_names():
    # Field 2 may contain spaces and ')'; fields 3.. follow the last ')'.
    fields = ["S", "1", "4242"] + [str(i) for i in range(6, 22)] + ["777", "0"]
    text = "4243 (we ird) name) " + " ".join(fields) + "\n"
    state, pgrp, start = parse_stat(text)
    assert (state, pgrp, start) == ("S", 4242, 777)


def test_parse_stat_of_self():
    with open("/proc/self/stat") as f:
        state, pgrp, start = parse_stat(f.read())
    assert state == "R" and pgrp > 0 and start > 0


def test_exit_reason():
    assert exit_reason(3) == "exit code 3"
    assert exit_reason(0) == "exit code 0"
    assert exit_reason(-9) == "killed by signal SIGKILL"
    assert "unknown" in exit_reason(None)


def test_first_error_line_prefers_launcher_line():
    assert first_error_line(b"noise\nswarmnet: exec /x: not found\n") == (
        "swarmnet: exec /x: not found"
    )
    assert first_error_line(b"hello\nsh: 1: foo: not found\n\n") == "sh: 1: foo: not found"
    assert first_error_line(b"") == ""
