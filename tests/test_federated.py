"""Federated fine-tuning: partitions, the in-process Flower simulation end to end (federated.json, plot,
model dir), FedProx/FedAdam, expert-sparse uplink, client-level DP, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from seekformer.cli import main
from seekformer.training.federated import partition, sparse_payload

from .test_finetune_cli import user_error, write_jsonl
from .test_multitask import make_tiny_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("fed") / "base")


@pytest.mark.parametrize("how", ["iid", "dirichlet", "by_label"])
def test_partitions_cover_every_example_once(how):
    labels = [i % 3 for i in range(60)]
    parts = partition(labels, 5, how, alpha=0.3, seed=1)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(60)) and all(parts)
    if how == "by_label":
        assert all(len({labels[i] for i in p}) == 1 for p in parts)
    if how == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_skews_labels():
    labels = [i % 2 for i in range(400)]
    parts = partition(labels, 8, "dirichlet", alpha=0.1, seed=0)
    shares = [np.mean([labels[i] for i in p]) for p in parts]
    assert max(shares) - min(shares) > 0.5  # strong label skew at alpha 0.1


ROWS = [{"text": f"the cat sat on mat {i}", "label": "pets"} if i % 2 else
        {"text": f"stocks fell by {i} points", "label": "money"} for i in range(48)]


def _recipe(tmp_path, base, federated, method="full", name="fed"):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", ROWS[:8])
    p = tmp_path / f"{name}.yaml"
    p.write_text(json.dumps({"base": base, "out": str(tmp_path / name),
                             "tasks": [{"name": "topic", "type": "classification", "train": train, "test": test}],
                             "train": {"method": method, "progress": False}, "federated": federated}))
    return str(p)


def test_federated_finetune_writes_model_report_and_plot(base, tmp_path):
    fed = {"clients": 4, "rounds": 2, "local_steps": 2, "local_batch_size": 4, "partition": "dirichlet", "alpha": 0.5}
    main(["finetune", _recipe(tmp_path, base, fed)])
    out = tmp_path / "fed"
    rep = json.loads((out / "federated.json").read_text())
    assert rep["rounds"] == 2 and len(rep["per_round"]) == 2 and len(rep["client_label_counts"]) == 4
    assert sum(sum(c.values()) for c in rep["client_label_counts"]) == 48
    assert all(set(c) <= {"pets", "money"} for c in rep["client_label_counts"])
    assert all("test_accuracy" in r and r["uplink_bytes"] == r["full_uplink_bytes"] > 0 for r in rep["per_round"])
    assert (out / "federated.png").is_file() and (out / "heads.safetensors").is_file()
    assert "test" in json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_other_strategies_run(base, tmp_path, strategy):
    fed = {"clients": 3, "rounds": 1, "local_steps": 1, "local_batch_size": 4, "strategy": strategy,
           "partition": "iid", "proximal_mu": 0.1}
    main(["finetune", _recipe(tmp_path, base, fed, method="frozen", name=strategy)])
    assert json.loads((tmp_path / strategy / "federated.json").read_text())["strategy"] == strategy


def test_expert_sparse_uplink_is_smaller(base, tmp_path):
    fed = {"clients": 2, "rounds": 1, "local_steps": 1, "local_batch_size": 1, "partition": "iid",
           "expert_sparse": True}
    main(["finetune", _recipe(tmp_path, base, fed, name="sparse")])
    r = json.loads((tmp_path / "sparse" / "federated.json").read_text())["per_round"][0]
    assert 0 < r["uplink_bytes"] <= r["full_uplink_bytes"] + 64  # (+ a bitmask of the rows it sends)
    # the payload itself: expert tensors cut to the used rows, the rows sent as a bitmask of ceil(E / 8) bytes
    a = [np.ones((8, 6, 4), np.float32), np.ones((4,), np.float32)]
    sent, nbytes = sparse_payload(a, [True, False], [0, None], {0: {1, 5}})
    assert sent[0].shape == (2, 6, 4) and nbytes == 2 * 6 * 4 * 4 + 1 + 16


def test_client_level_dp_is_reported(base, tmp_path):
    fed = {"clients": 4, "rounds": 2, "local_steps": 1, "local_batch_size": 4, "partition": "iid",
           "dp_noise_multiplier": 1.0, "dp_clip_norm": 0.5}
    main(["finetune", _recipe(tmp_path, base, fed, method="frozen", name="dp")])
    dp = json.loads((tmp_path / "dp" / "federated.json").read_text())["client_dp"]
    assert dp["epsilon"] > 0 and dp["noise_multiplier"] == 1.0


@pytest.mark.parametrize("fed,fragment", [
    ({"clients": 100}, "more than the training examples"),
    ({"strategy": "fedsgd"}, "unknown federated.strategy"),
    ({"partition": "random"}, "unknown federated.partition"),
    ({"dp_noise_multiplier": 1.0}, "dp_clip_norm"),
])
def test_bad_federated_settings_are_one_line_errors(base, tmp_path, capsys, fed, fragment):
    user_error(capsys, ["finetune", _recipe(tmp_path, base, fed, method="frozen")], fragment)


@pytest.mark.slow
def test_grpc_server_and_clients_on_localhost(base, tmp_path):
    """`seekformer federated server` + two `seekformer federated client` processes over Flower's gRPC."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fed = {"clients": 2, "rounds": 2, "local_steps": 2, "local_batch_size": 4, "partition": "iid"}
    r = _recipe(tmp_path, base, fed, method="frozen", name="grpc")
    addr = ["--address", f"127.0.0.1:{port}"]
    cmd = [sys.executable, "-m", "seekformer", "federated"]
    server = subprocess.Popen(cmd + ["server", r, *addr, "--round-timeout", "300"], stderr=subprocess.PIPE, text=True)
    clients = [subprocess.Popen(cmd + ["client", r, "--client", str(k), *addr], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for k in range(2)]
    try:
        _, err = server.communicate(timeout=600)
        assert server.returncode == 0, err[-2000:]
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
        for c in clients:
            c.wait(timeout=60)
    rep = json.loads((tmp_path / "grpc" / "federated.json").read_text())
    assert [h["round"] for h in rep["per_round"]] == [1, 2] and all("test_accuracy" in h for h in rep["per_round"])
    assert all(h["uplink_bytes"] > 0 for h in rep["per_round"])
