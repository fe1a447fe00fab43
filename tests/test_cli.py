import argparse
import subprocess
import sys

import pytest

from pregate.cli import build_parser, main


def subcommand_paths(parser: argparse.ArgumentParser, prefix=()):
    """Every (sub)command path of the parser, e.g. ("eval", "ppl")."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from subcommand_paths(sub, prefix + (name,))


def test_every_subcommand_has_help(capsys):
    paths = list(subcommand_paths(build_parser()))
    assert ("refactor",) in paths and ("eval", "ppl") in paths and ("data",) in paths
    for path in paths:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*path, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert "usage: pregate " + " ".join(path) in out, path


def test_top_level_help_runs_as_a_console_command():
    out = subprocess.run(
        [sys.executable, "-m", "pregate.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "refactor" in out and "eval" in out


def test_user_mistakes_exit_2_without_traceback(capsys, tmp_path):
    assert (
        main(["refactor", "no-such-model", "--out", str(tmp_path / "x"), "--tokens-per-domain", "512"]) == 2
    )
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "Traceback" not in err
    assert main(["refactor", "smollm2-135m", "--out", str(tmp_path / "y"), "--remain-rate", "1.5"]) == 2
    assert "remain_rate" in capsys.readouterr().err
    assert main(["eval", "ppl", str(tmp_path)]) == 2
    assert "not a pregate MoE checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bench_serve_refuses_workload_options_a_replayed_trace_would_ignore(capsys, tmp_path):
    from pregate.workload import WorkloadRequest, save_trace

    trace = tmp_path / "trace.jsonl"
    save_trace(trace, [WorkloadRequest("r0", "hello", 4, arrival_time=0.5)])
    assert main(["bench", "serve", str(tmp_path), "--trace", str(trace), "--rate", "0", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "replayed with its own requests and arrival times, so --rate, --seed would have no effect" in err
    assert "Traceback" not in err
    from pregate.bench import BenchConfig, BenchError, run_bench  # the library refuses too, before loading

    with pytest.raises(BenchError, match="so --requests would have no effect"):
        run_bench(tmp_path / "not-loaded", BenchConfig(requests=3), trace)


def test_data_lists_the_seven_domains(capsys):
    assert main(["data"]) == 0
    out = capsys.readouterr().out
    for name in ("arxiv", "book", "c4", "common_crawl", "github", "stackexchange", "wikipedia"):
        assert name in out


def test_refactor_and_eval_from_the_command_line(tiny_checkpoint, tmp_path, capsys):
    import json

    from pregate import data

    jsonl = tmp_path / "gamma.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"text": f"gamma record {i}: " + "lorem ipsum dolor " * 30}) for i in range(40))
    )
    out = tmp_path / "moe"
    args = [
        "refactor",
        str(tiny_checkpoint),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--add-domain",
        f"gamma={jsonl}",
        "--domains",
        "alpha",
        "gamma",
        "--tokens-per-domain",
        "128",
        "--block-len",
        "64",
    ]
    assert main(args) == 0
    assert "expert gamma" in capsys.readouterr().out
    data._USER.pop("gamma")  # a new process: eval must find the user's domain from the checkpoint's record
    assert (
        main(
            [
                "eval",
                "ppl",
                str(out),
                "--tokens-per-domain",
                "64",
                "--block-len",
                "64",
                "--json",
                str(tmp_path / "p.json"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "p.json").read_text())
    assert set(result["domains"]) == {"alpha", "gamma"}
    assert set(result["domains"]["gamma"]) == {"dense", "moe_domain", "moe_oracle", "moe_random", "control"}
    assert result["tokens_per_domain"] == 64
    assert "geo-mean" in capsys.readouterr().out
    assert main(args) == 2  # exists: refused without --force
    assert "already exists" in capsys.readouterr().err


def test_trace_route_then_simulate_policies(tiny_checkpoint, tmp_path, capsys):
    import json

    from pregate.refactor import RefactorConfig, refactor
    from pregate.workload import load_trace

    moe = refactor(
        str(tiny_checkpoint),
        tmp_path / "moe",
        RefactorConfig(domains=["alpha", "beta"], tokens_per_domain=128, block_len=64, dtype="float32"),
    )
    trace = tmp_path / "routed.jsonl"
    assert (
        main(
            [
                "trace",
                "route",
                str(moe),
                "--out",
                str(trace),
                "--requests",
                "6",
                "--max-prompt",
                "64",
                "--max-output",
                "8",
            ]
        )
        == 0
    )
    assert "oracle routing" in capsys.readouterr().out  # no trained router in a refactored checkpoint
    reqs = load_trace(trace)
    assert len(reqs) == 6 and all(
        len(r.output_experts) == r.output_len and set(r.prompt_experts) <= {0, 1} for r in reqs
    )
    out = tmp_path / "policies.json"
    assert (
        main(
            [
                "simulate",
                str(trace),
                "--policies",
                "decode-first",
                "expert-aware",
                "--rate",
                "50",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert "vs decode-first" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["policies"]) == {"decode-first", "expert-aware"}
    assert main(["simulate", str(trace), "--policies", "fcfs", "--cost", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["simulate", str(trace), "--policies", "fcfs", "--rate", "-1"]) == 2
    assert "rate" in capsys.readouterr().err
    assert main(["simulate", str(trace), "--policies", "fcfs", "--max-wait-steps", "-1"]) == 2
    refused = capsys.readouterr()
    assert "max_wait_steps=-1" in refused.err and refused.out == ""  # refused before anything prints
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main(["simulate", str(trace), "--policies", "fcfs", "--cost", str(tmp_path / "list.json")]) == 2
    assert "not a cost model" in capsys.readouterr().err
    assert main(["trace", "route", str(tmp_path / "missing"), "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "not a directory" in capsys.readouterr().err and not (tmp_path / "r.jsonl").exists()


def test_top_level_help_imports_no_torch():
    """`pregate --help` and a group's help fill in no subcommand, so they never import torch."""
    code = (
        "import sys\n"
        "from pregate.cli import main\n"
        "for argv in (['--help'], ['bench', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: pregate bench" in out
    assert out.strip().endswith("False")


def test_only_the_named_subcommand_is_filled_in():
    parser = build_parser(["simulate", "trace.jsonl"])
    args = parser.parse_args(["simulate", "trace.jsonl", "--resident-experts", "2", "3"])
    assert args.resident_experts == [2, 3] and args.func.__name__ == "cmd_simulate"
    assert parser.parse_args(["simulate", "t", "--cache-policy", "lru"]).cache_policy == "lru"
    # another subcommand named by the same parser has no options, so its flags are refused
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "cache", "dir", "--resident-experts", "2"])


def test_scheduling_commands_share_one_set_of_options():
    from pregate.cli.options import scheduler_config
    from pregate.scheduler import SchedulerConfig

    parser = build_parser()
    flags = [
        "--token-budget",
        "48",
        "--max-running",
        "5",
        "--prefill-chunk",
        "64",
        "--kv-capacity",
        "4096",
        "--max-wait-steps",
        "3",
        "--min-queue-tokens",
        "1",
        "--long-prefill-tokens",
        "128",
        "--max-bypass-steps",
        "7",
    ]
    want = SchedulerConfig(
        policy="decode-first",
        token_budget=48,
        max_running=5,
        prefill_chunk=64,
        kv_capacity_tokens=4096,
        max_wait_steps=3,
        min_queue_tokens=1,
        long_prefill_tokens=128,
        max_bypass_steps=7,
    )
    for argv in (
        ["serve", "m"],
        ["bench", "server", "m"],
        ["bench", "cache", "m"],
        ["simulate", "t"],
        ["trace", "export", "m", "--out", "x"],
    ):
        args = parser.parse_args([*argv, "--policy", "decode-first", *flags])
        assert scheduler_config(args) == want, argv
    # defaults come from the dataclasses: serve's are SchedulerConfig's own
    assert scheduler_config(parser.parse_args(["serve", "m"])) == SchedulerConfig()


def test_json_is_optional_everywhere():
    parser = build_parser()
    for argv in (
        ["data"],
        ["eval", "ppl", "m"],
        ["eval", "tasks", "m"],
        ["bench", "serve", "m"],
        ["bench", "step", "m"],
        ["bench", "server", "m"],
        ["bench", "cache", "m"],
        ["simulate", "t"],
    ):
        assert parser.parse_args(argv).json is None, argv


def test_bench_cache_then_trace_export(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import json

    from pregate.refactor import RefactorConfig, refactor

    moe = refactor(
        str(tiny_checkpoint),
        tmp_path / "moe",
        RefactorConfig(domains=["alpha", "beta"], tokens_per_domain=128, block_len=64, dtype="float32"),
    )
    small = ["--requests", "4", "--max-prompt", "32", "--max-output", "6", "--token-budget", "16"]
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.iterdir())
    assert main(["bench", "cache", str(moe), "--resident-experts", "1", "2", "--no-measure", *small]) == 0
    assert "belady" in capsys.readouterr().out
    assert set(tmp_path.iterdir()) == before  # without --json nothing is written
    out = tmp_path / "cache" / "cache.json"
    assert main(["bench", "cache", str(moe), "--resident-experts", "1", "2", "--json", str(out), *small]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["scheduler"]["token_budget"] == 16 and result["config"]["capacities"] == [1, 2]
    assert all(r["tokens_identical"] for r in result["measured"]["runs"])
    assert result["measured"]["repeats"] == 3  # every setting measured 3 times, interleaved
    assert all(
        len(r["repeats"]) == 3 and r["normalized_latency"] in r["repeats"] for r in result["measured"]["runs"]
    )
    measured = result["measured"]
    for on in (r for r in measured["runs"] if r["prefetch"]):  # against perfect overlap, both metrics
        off = next(r for r in measured["runs"] if r["k"] == on["k"] and not r["prefetch"])
        for metric, resident, perfect, share in (
            ("normalized_latency", "all_resident_normalized_latency", "perfect_overlap", "overlap_share"),
            ("makespan_s", "all_resident_makespan_s", "perfect_makespan_s", "makespan_share"),
        ):
            v, c = off[metric], measured[resident]
            load = off["stall_s"] if metric == "makespan_s" else v - c  # on time: the link's measured time
            assert on[perfect] == pytest.approx(max(c, load))
            room = v - on[perfect]
            if room > 0:
                assert on[share] == pytest.approx((v - on[metric]) / room)
            else:  # nothing to hide: no share to report
                assert on[share] is None
        assert 0 < on["copy_s"] <= on["load_s"]  # the loads' own time, within the link's
    assert "share" in capsys.readouterr().out
    assert main(["bench", "cache", str(moe), "--repeats", "2", *small]) == 2
    assert "must be an odd integer" in capsys.readouterr().err
    refs = tmp_path / "refs.txt"
    trace = out.parent / "routed_trace.jsonl"
    assert (
        main(["trace", "export", str(moe), "--trace", str(trace), "--out", str(refs), "--token-budget", "16"])
        == 0
    )
    assert (out.parent / "references.txt").read_text() == refs.read_text()
    assert main(["trace", "export", str(tmp_path), "--out", str(refs)]) == 2
    assert "not a pregate MoE checkpoint" in capsys.readouterr().err
