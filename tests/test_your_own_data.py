"""Every algorithm on data that is not the MNIST sample, from Python and from the ``colearn`` CLI.

Four data sets, none downloaded: (a) scikit-learn's bundled digits (64 tabular features, an MLP),
(b) 3 x 32 x 32 colour images (torchvision's FakeData, the CIFAR CNN), (c) Fashion-MNIST read by
``torchvision.datasets.FashionMNIST`` from the Debian package's files, and (d) a Hugging Face
``Dataset.from_dict`` with string labels. Each runs independent training, the swarm, mutual
learning, voting, FedAvg and PoFL for two short rounds; the runs must leave each algorithm's own
record (moves, votes, rounds, blocks) and finite weights, with the model's shapes taken from the data.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from helpers import fast_trainer
from lightning_colearn import (CohortDataModule, CohortModule, CollectiveVoting, FederatedAveraging, Ledger,
                               MutualLearning, ParticleSwarm, ProofOfLearning)
from lightning_colearn.cli import ConfigError, train
from lightning_colearn.data.datasets import DEBIAN_FASHION_MNIST
from lightning_colearn.metrics.scoring import score
from lightning_colearn.models import MLP, CifarCNN, for_data

datasets = pytest.importorskip("datasets")  # the hf extra, installed by make test
sklearn_datasets = pytest.importorskip("sklearn.datasets")
tv_datasets = pytest.importorskip("torchvision.datasets")
transforms = pytest.importorskip("torchvision.transforms")

ALGORITHMS = ("independent", "swarm", "mutual", "voting", "fedavg", "pofl")
DATA = ("digits", "colour", "fashion", "hf")
FASHION = DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz"
needs_fashion = pytest.mark.skipif(not FASHION.is_file(), reason=f"{FASHION} missing (Debian package dataset-fashion-mnist)")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny runs: two intra-op threads on a busy 2-core machine only slow them down
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------- the data sets, as a user would write them
def fashion_mnist(root: str, train: bool = True, size: int | None = None):
    """torchvision's FashionMNIST with the usual ToTensor + Normalize (the first ``size`` samples if given)."""
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    ds = tv_datasets.FashionMNIST(root, train=train, transform=tf)
    return ds if size is None else Subset(ds, range(size))


def hf_table(n: int = 240, seed: int = 0):
    """A Hugging Face data set with a vector column and string labels, separable enough to learn in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 8)) + 2.0 * y[:, None]
    return datasets.Dataset.from_dict({"features": x.astype(np.float32).tolist(),
                                       "label": [("cat", "dog", "eel")[i] for i in y]})


def colour_images(size: int = 96):
    return tv_datasets.FakeData(size=size, image_size=(3, 32, 32), num_classes=4, transform=transforms.ToTensor())


def _datamodule(name: str, fashion_root: Path | None, **kwargs) -> CohortDataModule:
    kwargs = {"num_members": 3, "batch_size": 16, "eval_batch_size": 64, "splits": (0.75, 0.25, 0.0), "seed": 0, **kwargs}
    if name == "digits":
        x, y = sklearn_datasets.load_digits(return_X_y=True)
        return CohortDataModule.from_tensors(x[:300] / 16.0, y[:300], **kwargs)
    if name == "colour":
        return CohortDataModule(colour_images(), **kwargs)
    if name == "fashion":
        return CohortDataModule(fashion_mnist(str(fashion_root)), test_dataset=fashion_mnist(str(fashion_root), False, 256),
                                max_train_samples=240, **kwargs)
    return CohortDataModule(hf_table(), **kwargs)


def _model(dm: CohortDataModule):
    if dm.shapes().get("in_channels") == 3:
        return for_data(CifarCNN, dm, channels=(8, 8), hidden=(32, 16))
    return for_data(MLP, dm, hidden=32)


# ---------------------------------------------------------------------------------- Python
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("name", DATA)
def test_every_algorithm_runs_on_non_mnist_data_from_python(name, algorithm, tmp_path, request):
    root = request.getfixturevalue("fashion_root") if name == "fashion" else None
    dm = _datamodule(name, root, stream="shared" if algorithm == "mutual" else "per_member")
    dm.setup("fit")
    expected = {"digits": (64, 10), "colour": (3 * 32 * 32, 4), "fashion": (784, 10), "hf": (8, 3)}[name]
    assert (dm.shapes()["in_features"], dm.num_classes) == expected
    factory = _model(dm)
    torch.manual_seed(0)
    module = MutualLearning([factory() for _ in range(3)]) if algorithm == "mutual" else CohortModule(factory, size=3)
    callback = {
        "independent": None, "mutual": None,
        "swarm": ParticleSwarm(every_n_steps=2, n_particles=3),
        "voting": CollectiveVoting(steps_per_round=2),
        "fedavg": FederatedAveraging(clients_per_round=2),
        "pofl": ProofOfLearning(miners=2, clients_per_round=2, threshold=0.0, ledger=tmp_path / "ledger.db"),
    }[algorithm]
    trainer = fast_trainer(max_epochs=2, limit_train_batches=3, callbacks=[callback] if callback else [])
    trainer.fit(module, datamodule=dm)
    results = trainer.test(module, datamodule=dm, verbose=False)[0]

    assert 0.0 <= results["test_acc/mean"] <= 1.0 and math.isfinite(results["test_loss/mean"])
    assert all(torch.isfinite(p).all() for p in module.parameters())
    if algorithm == "swarm":
        assert [r["step"] for r in callback.history] == list(range(2, trainer.global_step + 1, 2))
    elif algorithm == "voting":
        assert [r["round"] for r in callback.results] == [0, 1]
        assert all(r["voters"] == 2 and sum(v is not None for v in r["votes"]) == 2 for r in callback.results)
    elif algorithm == "fedavg":
        assert [len(r["clients"]) for r in callback.history] == [2, 2]
    elif algorithm == "pofl":
        with Ledger(tmp_path / "ledger.db") as ledger:
            assert len(ledger) == 2 and ledger.verify()


# -------------------------------------------------------------------------------------- CLI
def _data_overrides(name: str, fashion_root: Path | None, size: int = 96) -> list[str]:
    if name == "digits":  # conf/data/digits.yaml: scikit-learn's bundled set through the package's factory
        return ["data=digits", "model=mlp", "+data.max_train_samples=240"]
    if name == "colour":  # a torchvision data set named by its _target_, the CIFAR CNN's shapes from the data
        return ["data=custom", "data.dataset._target_=torchvision.datasets.FakeData", f"+data.dataset.size={size}",
                "+data.dataset.image_size=[3,32,32]", "+data.dataset.num_classes=4",
                "+data.dataset.transform={_target_: torchvision.transforms.ToTensor}",
                "model=cifar_cnn", "+model.channels=[8,8]", "+model.hidden=[32,16]"]
    if name == "fashion":  # a factory of the user's own (this module), for both the training and the test set
        return ["data=custom", "data.dataset._target_=test_your_own_data.fashion_mnist", f"+data.dataset.root={fashion_root}",
                "+data.test_dataset={_target_: test_your_own_data.fashion_mnist, root: " + str(fashion_root) + ", train: false, size: 256}",
                "data.max_train_samples=240", "model=mlp"]
    return ["data=custom", "data.dataset._target_=test_your_own_data.hf_table", "model=mlp"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("name", DATA)
def test_every_algorithm_runs_on_non_mnist_data_from_the_cli(name, algorithm, make_cfg, tmp_path, request, capsys):
    root = request.getfixturevalue("fashion_root") if name == "fashion" else None
    extra = {"pofl": ["algorithm.miners=2", "algorithm.clients_per_round=2", "algorithm.threshold=0.0"],
             "fedavg": ["algorithm.clients_per_round=2"], "swarm": ["algorithm.callbacks.swarm.n_particles=3"]}.get(algorithm, [])
    cfg = make_cfg(f"algorithm={algorithm}", "cohort.size=3", *_data_overrides(name, root), *extra,
                   "trainer=debug", "trainer.max_epochs=2", "++trainer.limit_train_batches=2", "data.batch_size=16",
                   "data.eval_batch_size=64", "plots=false", "trainer.enable_progress_bar=false")
    results = train(cfg)

    assert 0.0 <= results["test_acc/mean"] <= 1.0 and math.isfinite(results["test_loss/mean"])
    out = tmp_path / "out"
    assert (out / "partition.csv").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("data: "))
    assert line.startswith("data: 3 members; train samples min / median / max")
    if algorithm == "pofl":
        with Ledger(out / "ledger.db") as ledger:
            assert len(ledger) >= 1 and ledger.verify()


def test_cli_writes_the_label_distribution_plot_and_names_a_model_that_does_not_fit(make_cfg, tmp_path, capsys):
    train(make_cfg("data=digits", "model=mlp", "data.partition=dirichlet", "data.alpha=0.3", "trainer=debug",
                   "trainer.max_epochs=1", "++trainer.limit_train_batches=2", "trainer.enable_progress_bar=false"))
    out = tmp_path / "out"
    assert (out / "plots" / "label_distribution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("data: "))
    assert "classes per member" in summary and "of 10" in summary
    with pytest.raises(ConfigError, match=r"model: ConvNet takes images \[C, H, W\].*64 features"):
        train(make_cfg("data=digits", "model=convnet", "trainer=debug"))
    with pytest.raises(ConfigError, match=r"data.dataset._target_ is not set \(\?\?\? in the config\)"):
        train(make_cfg("data=custom", "trainer=debug"))
    with pytest.raises(ConfigError, match=r"model.in_features is 784 but the data gives 64"):
        train(make_cfg("data=digits", "model=mlp", "+model.in_features=784", "trainer=debug"))


# ------------------------------------------------------------------ a user's own LightningDataModule
class DigitsDataModule(L.LightningDataModule):
    """What a user already has: train / val / test loaders over scikit-learn's digits."""

    def setup(self, stage=None):
        x, y = sklearn_datasets.load_digits(return_X_y=True)
        x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
        self.train, self.val, self.test = (TensorDataset(x[a:b], y[a:b]) for a, b in ((0, 1200), (1200, 1500), (1500, 1797)))

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=100)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=100)


def test_voting_and_fedavg_run_on_a_users_own_datamodule():
    """The callbacks that need per-member data (votes) and a shared evaluation set (the server) run on it unchanged."""
    user_dm = DigitsDataModule()
    dm = CohortDataModule.from_datamodule(user_dm, num_members=4, partition="dirichlet", alpha=1.0, splits=(0.8, 0.2, 0.0))
    dm.setup("fit")
    assert dm.batch_size == 32 and sum(dm.member_sizes("train")) + sum(dm.member_sizes("vote")) == 1200
    torch.manual_seed(0)
    voting = CollectiveVoting(steps_per_round=5)
    module = CohortModule(for_data(MLP, dm, hidden=32), size=4, optimizer=partial(torch.optim.Adam, lr=1e-2))
    fast_trainer(max_epochs=4, callbacks=[voting]).fit(module, datamodule=dm)
    assert len(voting.results) == 4 and any(r["accepted"] for r in voting.results)

    fed = FederatedAveraging(clients_per_round=2)
    module = CohortModule(for_data(MLP, dm, hidden=32), size=4, optimizer=partial(torch.optim.Adam, lr=1e-2))
    fast_trainer(max_epochs=3, callbacks=[fed]).fit(module, datamodule=dm)
    # the server scores the global model on the user's own validation loader
    from torchmetrics.classification import MulticlassAccuracy

    own = score(module.cohort[0], user_dm.val_dataloader(), MulticlassAccuracy(num_classes=10, average="micro"), torch.device("cpu"))
    assert fed.history[-1]["score"] == pytest.approx(own) and own > 0.5


# ------------------------------------------------------------------ other tasks: regression, token sequences
def test_regression_targets_with_a_size_skewed_partition_and_a_lower_is_better_vote():
    from torch.nn import functional as F
    from torchmetrics.regression import MeanSquaredError

    x, y = sklearn_datasets.load_diabetes(return_X_y=True)
    dm = CohortDataModule.from_tensors((x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std(), num_members=3,
                                       partition="linear", splits=(0.7, 0.3, 0.0), batch_size=16)
    dm.setup("fit")
    assert dm.task == "regression" and dm.num_classes is None and "num_classes" not in dm.shapes()
    sizes = [t + v for t, v in zip(dm.member_sizes("train"), dm.member_sizes("vote"))]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]  # linear size skew: member i gets a share ~ i + 1
    assert next(iter(dm.eval_dataloader()))[1].shape[1:] == (1,)  # [B, 1]: what a one-output model gives
    with pytest.raises(ValueError, match=r"data.partition='dirichlet' needs class labels, but the data set has regression targets"):
        CohortDataModule.from_tensors(x, y, num_members=3, partition="dirichlet").setup("fit")

    torch.manual_seed(0)
    voting = CollectiveVoting(criterion=MeanSquaredError(), steps_per_round=5)
    assert voting.maximize is False
    module = CohortModule(for_data(MLP, dm, hidden=16, num_classes=1), size=3, loss=F.mse_loss,
                          optimizer=partial(torch.optim.Adam, lr=1e-2))
    assert module.num_classes is None  # one output: a regressor, no accuracy
    fast_trainer(max_epochs=4, callbacks=[voting]).fit(module, datamodule=dm)
    accepted = [r for r in voting.results if r["accepted"]]
    assert accepted, voting.results
    for r in accepted:  # a yes vote means a lower error on the voter's own data
        for j, vote in enumerate(r["votes"]):
            if vote:
                assert r["scores"][j] < r["current"][j]
    results = fast_trainer(max_epochs=1).test(module, datamodule=dm, verbose=False)[0]
    assert results["test_loss/mean"] < 1.0  # targets are standardised: a constant guess scores ~1


def test_token_sequences_with_padding_collate_and_an_embedding_model():
    from lightning_colearn.models import EmbeddingBagClassifier

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 9, 160)
    y = rng.integers(0, 2, 160)
    # class 1 sequences use tokens 11-20, class 0 tokens 1-10: ragged lists, as a tokenizer gives them
    rows = [(rng.integers(1, 11, n) + 10 * c).tolist() for n, c in zip(lengths, y)]
    ds = datasets.Dataset.from_dict({"input_ids": rows, "label": y.tolist()})

    def pad(samples):
        width = max(len(x) for x, _ in samples)
        ids = torch.tensor([x + [0] * (width - len(x)) for x, _ in samples])
        return ids, torch.stack([t for _, t in samples])

    dm = CohortDataModule(ds, num_members=2, collate_fn=pad, batch_size=16, splits=(1.0, 0.0, 0.0), seed=0)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))[0][0]
    assert x.dtype == torch.int64 and x.ndim == 2
    torch.manual_seed(0)
    module = CohortModule(partial(EmbeddingBagClassifier, vocab_size=21, embed_dim=8, num_classes=2), size=2,
                          optimizer=partial(torch.optim.Adam, lr=0.05))
    fast_trainer(max_epochs=3).fit(module, datamodule=dm)
    assert fast_trainer().test(module, datamodule=dm, verbose=False)[0]["test_acc/mean"] > 0.9


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_runs_on_custom_data(experiment, make_cfg):
    """data=custom composes with every experiment file (their data overrides are data keys every data config has)."""
    cfg = make_cfg(f"experiment={experiment}", *_data_overrides("colour", None, size=400)[:-3],
                   "trainer=debug", "trainer.max_epochs=1", "++trainer.limit_train_batches=2", "++trainer.max_steps=2",
                   "++trainer.limit_val_batches=1", "data.eval_batch_size=40", "plots=false", "trainer.enable_progress_bar=false")
    results = train(cfg)
    assert 0.0 <= results["test_acc/mean"] <= 1.0 and math.isfinite(results["test_loss/mean"])
