"""Tests for neuromask_pl.classifiers.checkpoint (LightningCheckpointClassifier): a tiny LightningModule
trained for three steps by a real CPU Trainer, checkpoints written under tmp_path, no downloads."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import make_trainer, write_cli_config
from jsonargparse import ArgumentParser
from PIL import Image
from torch import nn

from neuromask_pl import NeuroMask
from neuromask_pl.classifiers import FactoryClassifier, LightningCheckpointClassifier, describe_classifier
from neuromask_pl.classifiers.trust import Inert
from neuromask_pl.cli import main
from neuromask_pl.data import TensorDataModule

CLASS = f"{__name__}.LitNet"


class Note:
    """A custom object that a checkpoint may pickle into its hyper-parameters."""

    def __init__(self, text: str) -> None:
        self.text = text


class LitNet(pl.LightningModule):
    """conv -> BatchNorm -> ReLU -> Dropout -> pool -> linear, as a LightningModule."""

    def __init__(self, width: int, num_classes: int = 3, note: object = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


try:  # the unified package, as often used as pytorch_lightning (installed by the test extra)
    import lightning.pytorch as lightning_pytorch
except ImportError:
    lightning_pytorch = None


class Scale(nn.Module):
    """A project's own layer class (a network pickled into a checkpoint names it)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def make_net(width: int = 5, num_classes: int = 3) -> nn.Sequential:
    """The network that ``NetHost`` holds (also a factory for the state_dict loaders)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        Scale(2.0),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


def net_host_class(base: type) -> type:
    """A LightningModule on ``base`` as the most used project template writes one: the network is passed in
    and saved among the hyper-parameters (``save_hyperparameters(logger=False)`` without ``ignore``)."""

    class NetHost(base):
        def __init__(self, net: nn.Module, lr: float = 0.5) -> None:
            super().__init__()
            self.save_hyperparameters(logger=False)
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            images, labels = batch
            return F.cross_entropy(self(images), labels)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    return NetHost


# The template's choice, which Lightning warns about when NetHost is built: the network among the hyper-parameters.
net_in_hparams = pytest.mark.filterwarnings("ignore:Attribute 'net' is an instance of `nn.Module`:UserWarning")
PlNetHost = net_host_class(pl.LightningModule)
PlNetHost.__qualname__ = PlNetHost.__name__ = "PlNetHost"
if lightning_pytorch is not None:
    LNetHost = net_host_class(lightning_pytorch.LightningModule)
    LNetHost.__qualname__ = LNetHost.__name__ = "LNetHost"


@pytest.fixture(scope="module", params=["pytorch_lightning", "lightning"])
def host_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, nn.Module, Path]:
    """A NetHost on either package trained for 2 steps by that package's Trainer: (class path, module, checkpoint)."""
    if request.param == "lightning" and lightning_pytorch is None:
        pytest.skip("the lightning package is not installed (pip install 'neuromask-pl[test]')")
    package, name = (pl, "PlNetHost") if request.param == "pytorch_lightning" else (lightning_pytorch, "LNetHost")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = globals()[name](make_net())
        data = torch.utils.data.TensorDataset(torch.rand(8, 3, 8, 8), torch.randint(0, 3, (8,)))
        trainer = package.Trainer(
            accelerator="cpu",
            max_steps=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    path = tmp_path_factory.mktemp("host") / f"{request.param}.ckpt"
    trainer.save_checkpoint(path)
    return f"{__name__}.{name}", model.eval(), path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[LitNet, Path]:
    """A LitNet trained for 3 steps by a CPU Trainer (BatchNorm statistics moved), and its checkpoint."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LitNet(width=6)
        data = torch.utils.data.TensorDataset(torch.rand(12, 3, 8, 8), torch.randint(0, 3, (12,)))
        trainer = make_trainer(max_steps=3, inference_mode=True)
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    path = tmp_path_factory.mktemp("ckpt") / "m.ckpt"
    trainer.save_checkpoint(path)
    return model.eval(), path


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def edited_checkpoint(source: Path, target: Path, edit) -> str:
    """Copy a checkpoint with ``edit(ckpt)`` applied, saved with torch.save."""
    ckpt = torch.load(source, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, target)
    return str(target)


# --- loading -----------------------------------------------------------------------------


def test_checkpoint_logits_equal_the_modules_eval_logits(trained, images):
    model, path = trained
    clf = LightningCheckpointClassifier(CLASS, str(path), class_names=["a", "b", "c"])
    with torch.no_grad():
        expected = model(images)
        assert torch.equal(clf(images), expected)
        # the training really changed the weights and the BatchNorm statistics: a fresh LitNet differs
        assert not torch.equal(LitNet(width=6).eval()(images), expected)
        # eval mode matters (Dropout, BatchNorm), and the loaded module is in it
        assert not clf.training and not clf.model.training
        assert not torch.equal(clf.model.train()(images), expected)
    assert isinstance(clf.model, LitNet) and clf.model.hparams.width == 6
    assert clf.class_names == ["a", "b", "c"] and clf.in_channels == 3
    info = describe_classifier(clf)
    assert info["source_file"] == str(path)
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_colon_class_path_normalisation_and_model_attribute(trained, images):
    model, path = trained
    clf = LightningCheckpointClassifier(f"{__name__}:LitNet", str(path), mean=0.5, std=0.25)
    net = LightningCheckpointClassifier(CLASS, str(path), model_attribute="net")
    with torch.no_grad():
        assert torch.equal(clf(images), model((images - 0.5) / 0.25))
        assert torch.equal(net(images), model.net(images))
    assert type(net.model) is nn.Sequential and not net.model.training
    assert set(net.state_dict()) == {f"model.{k}" for k in model.net.state_dict()}


def test_model_attribute_errors(trained):
    _, path = trained
    with pytest.raises(ValueError, match=r"LitNet has no attribute 'nett'; its sub-modules are \['net'\]"):
        LightningCheckpointClassifier(CLASS, str(path), model_attribute="nett")
    with pytest.raises(ValueError, match=r"'net\.head': net has no attribute 'head'; its sub-modules are \['0', '1'"):
        LightningCheckpointClassifier(CLASS, str(path), model_attribute="net.head")
    with pytest.raises(TypeError, match="model_attribute 'hparams' is of type AttributeDict, not a torch.nn.Module"):
        LightningCheckpointClassifier(CLASS, str(path), model_attribute="hparams")


def test_pickled_hyper_parameter_needs_weights_only_false(trained, images, tmp_path):
    model, path = trained
    unsafe = edited_checkpoint(path, tmp_path / "note.ckpt", lambda c: c["hyper_parameters"].update(note=Note("hi")))
    message = (
        rf"note\.ckpt holds pickled Python objects .*\({__name__}\.Note\).*Three ways on: .*FactoryClassifier.*"
        rf"trusted=\['{__name__}\.Note'\] .*weights_only=False"
    )
    with pytest.raises(ValueError, match=message):
        LightningCheckpointClassifier(CLASS, unsafe)
    clf = LightningCheckpointClassifier(CLASS, unsafe, weights_only=False)
    assert isinstance(clf.model.hparams.note, Note) and clf.model.hparams.note.text == "hi"
    with torch.no_grad():
        assert torch.equal(clf(images), model(images))


def test_lightning_cli_checkpoint_with_plain_values_loads_and_other_instantiators_are_refused(
    trained, images, tmp_path
):
    model, path = trained

    def cli_hparams(ckpt):
        ckpt["hyper_parameters"].update(_instantiator="pytorch_lightning.cli.instantiate_module", _class_path=CLASS)

    clf = LightningCheckpointClassifier(CLASS, edited_checkpoint(path, tmp_path / "cli.ckpt", cli_hparams))
    with torch.no_grad():
        assert torch.equal(clf(images), model(images))
    evil = edited_checkpoint(
        path, tmp_path / "evil.ckpt", lambda c: c["hyper_parameters"].update(_instantiator="os.system")
    )
    with pytest.raises(ValueError, match="instantiator 'os.system', which is not Lightning's"):
        LightningCheckpointClassifier(CLASS, evil)


def test_state_dict_round_trip_through_factory(trained, images, tmp_path):
    model, path = trained
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    kwargs = {"width": 6}
    plain = FactoryClassifier(f"{__name__}:LitNet", kwargs, weights=str(tmp_path / "sd.pt"))
    from_ckpt = FactoryClassifier(f"{__name__}:LitNet", kwargs, weights=str(path))  # its "state_dict" key
    with torch.no_grad():
        assert torch.equal(plain(images), model(images))
        assert torch.equal(from_ckpt(images), model(images))


# --- checkpoints of Lightning projects ----------------------------------------------------------


@net_in_hparams
def test_module_class_may_come_from_either_lightning_package(host_run, images):
    name, model, path = host_run
    clf = LightningCheckpointClassifier(name, str(path), weights_only=False)
    with torch.no_grad():
        assert torch.equal(clf(images), model(images))
        assert not torch.equal(make_net()(images), model(images))  # the 2 steps changed the weights
    assert type(clf.model) is type(model) and not clf.model.training


def pickled_classes(net: nn.Module) -> list[str]:
    """What unpickling ``net`` imports: the class of each of its modules (the independent reference)."""
    return sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in net.modules()})


@net_in_hparams
def test_a_network_in_the_hyper_parameters_is_refused_naming_the_three_ways_on(host_run):
    name, model, path = host_run
    with pytest.raises(ValueError) as refused:
        LightningCheckpointClassifier(name, str(path), model_attribute="net")
    message = str(refused.value)
    layers = sorted(n.rpartition(".")[2] for n in pickled_classes(model.net) if n.startswith("torch.nn."))
    assert f"objects of your package {__name__} ({__name__}.Scale)" in message  # what the file holds
    assert f"torch.nn layers ({', '.join(layers)})" in message
    assert "state_dict_prefix='net.'" in message and path.name in message  # way 1
    assert f"trusted=['{__name__}.Scale']" in message  # way 2, the project's own: torch.nn's layers come with it
    assert "weights_only=False" in message  # way 3
    assert len(message.splitlines()) == 1


@net_in_hparams
def test_trusted_classes_load_it_with_weights_only(host_run, images):
    """The project's classes listed, torch.nn's own layer classes come with them; nothing else."""
    name, model, path = host_run
    for trusted in ([f"{__name__}.Scale"], [f"{__name__}:Scale"], pickled_classes(model.net)):
        clf = LightningCheckpointClassifier(name, str(path), trusted=trusted)
        with torch.no_grad():
            assert torch.equal(clf(images), model(images))
        assert type(clf.model.hparams.net) is nn.Sequential and clf.model.hparams.net[3].factor == 2.0
    # a class of the network left out is read as inert data: the network cannot run, so it is refused, and named
    with pytest.raises(ValueError, match=rf"the network holds .*inert data: net\.3 \({__name__}\.Scale\)"):
        LightningCheckpointClassifier(name, str(path), trusted=["torch.nn.Linear"])


def test_trusted_names_are_checked(trained):
    _, path = trained
    with pytest.raises(ValueError, match="trusted= .* weights_only=False .*give one"):
        LightningCheckpointClassifier(CLASS, str(path), trusted=["torch.nn.Linear"], weights_only=False)
    with pytest.raises(TypeError, match="trusted must be a list of class paths"):
        LightningCheckpointClassifier(CLASS, str(path), trusted="torch.nn.Linear")
    with pytest.raises(ValueError, match=r"could not import module 'no_such_pkg_xyz' of trusted"):
        LightningCheckpointClassifier(CLASS, str(path), trusted=["no_such_pkg_xyz.Net"])


def test_trusted_pickled_object_in_the_hyper_parameters(trained, images, tmp_path):
    model, path = trained
    unsafe = edited_checkpoint(path, tmp_path / "note.ckpt", lambda c: c["hyper_parameters"].update(note=Note("hi")))
    clf = LightningCheckpointClassifier(CLASS, unsafe, trusted=[f"{__name__}.Note"])
    assert isinstance(clf.model.hparams.note, Note) and clf.model.hparams.note.text == "hi"
    with torch.no_grad():
        assert torch.equal(clf(images), model(images))


class Call:
    """Pickles as ``function(*args)``: the gadget of a hostile checkpoint."""

    def __init__(self, function: object, *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.function, self.args


def test_a_gadget_is_named_never_suggested_for_trust_and_never_run(trained, images, tmp_path):
    model, path = trained
    marker = tmp_path / "the_gadget_ran"
    note = Call(subprocess.run, ["touch", str(marker)])
    gadget = edited_checkpoint(path, tmp_path / "gadget.ckpt", lambda c: c["hyper_parameters"].update(note=note))
    (name,) = torch.serialization.get_unsafe_globals_in_checkpoint(gadget)  # commands.run: pickle's name for it
    with pytest.raises(ValueError) as refused:
        LightningCheckpointClassifier(CLASS, gadget)
    message = str(refused.value)
    assert f"other objects ({name})" in message  # what the file holds
    assert "trusted=[the network's own classes]" in message and f"'{name}" not in message  # not what to trust
    # a file trusted for the user's own classes: the gadget is read as inert data, and never runs
    clf = LightningCheckpointClassifier(CLASS, gadget, trusted=[f"{__name__}.Note"])
    assert isinstance(clf.model.hparams.note, Inert) and clf.model.hparams.note.global_name == name
    with torch.no_grad():
        assert torch.equal(clf(images), model(images))
    copy.deepcopy(clf)
    pickle.loads(pickle.dumps(clf.model.hparams.note))  # inert data stays inert through copies
    assert not marker.exists()
    torch.load(gadget, weights_only=False)  # the gadget is live: full unpickling runs it
    assert marker.exists()


def test_a_gadget_of_the_os_module_is_refused_even_for_a_trusted_file(trained, tmp_path):
    _, path = trained
    marker = tmp_path / "the_gadget_ran"
    note = Call(os.system, f"touch {marker}")
    gadget = edited_checkpoint(path, tmp_path / "gadget.ckpt", lambda c: c["hyper_parameters"].update(note=note))
    system = f"{os.system.__module__}.system"  # posix.system
    for trusted in (None, [f"{__name__}.Note"]):
        with pytest.raises(ValueError, match=rf"{system} belong to modules .* never reads.*treat the file as hostile"):
            LightningCheckpointClassifier(CLASS, gadget, trusted=trusted)
    assert not marker.exists()


class Tripwire:
    """An object in a checkpoint's hyper-parameters that leaves a file behind if it is ever unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __setstate__(self, state: dict[str, str]) -> None:
        Path(state["path"]).touch()


@net_in_hparams
def test_state_dict_prefix_takes_the_network_out_of_a_lightning_checkpoint(host_run, images, tmp_path):
    """FactoryClassifier(weights=<.ckpt>, state_dict_prefix="net."): the network's weights, nothing else unpickled."""
    _, model, path = host_run
    marker = tmp_path / "unpickled"
    ckpt = torch.load(path, weights_only=False)  # the test's own file
    ckpt["hyper_parameters"]["trap"] = Tripwire(str(marker))
    torch.save(ckpt, tmp_path / "trapped.ckpt")
    for weights in (str(path), str(tmp_path / "trapped.ckpt")):
        clf = FactoryClassifier(f"{__name__}:make_net", weights=weights, state_dict_prefix="net.")
        with torch.no_grad():
            assert torch.equal(clf(images), model.net(images))
    assert not marker.exists()
    torch.load(tmp_path / "trapped.ckpt", weights_only=False)  # the tripwire is live: full unpickling trips it
    assert marker.exists()
    with pytest.raises(ValueError, match=r"under the prefix 'net\.'.*state_dict_prefix='net\.'"):
        FactoryClassifier(f"{__name__}:make_net", weights=str(path))
    with pytest.raises(ValueError, match=r"no key .* starts with state_dict_prefix='encoder\.'.*'net\.'"):
        FactoryClassifier(f"{__name__}:make_net", weights=str(path), state_dict_prefix="encoder.")


# --- untrusted checkpoints run no code ------------------------------------------------------


def record_call(path: str) -> nn.Module:
    """Stands in for ``os.system``: a callable a hostile checkpoint names; it leaves a file behind when called."""
    Path(path).touch()
    return nn.Identity()


class TypedHost(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


class UntypedHost(pl.LightningModule):
    def __init__(self, net) -> None:  # noqa: ANN001 (untyped on purpose)
        super().__init__()
        self.net = net


def hostile_checkpoint(path: Path, marker: Path) -> str:
    """Only dicts and strings (it passes ``torch.load(weights_only=True)``), yet under LightningCLI's instantiator
    its ``net`` builds ``FactoryClassifier(factory=<callable>, kwargs=...)``, which calls the callable."""
    factory = {"factory": f"{__name__}:record_call", "kwargs": {"path": str(marker)}}
    torch.save(
        {
            "state_dict": {},
            "pytorch-lightning_version": pl.__version__,
            "hyper_parameters": {
                "_instantiator": "pytorch_lightning.cli.instantiate_module",
                "net": {"class_path": "neuromask_pl.classifiers.FactoryClassifier", "init_args": factory},
            },
        },
        path,
    )
    torch.load(path, weights_only=True)  # the safe unpickler finds nothing wrong with it
    return str(path)


@pytest.mark.parametrize("host", ["TypedHost", "UntypedHost"])
def test_a_class_path_in_the_hyper_parameters_is_not_instantiated_by_default(tmp_path, host):
    marker = tmp_path / "the_checkpoint_ran_code"
    path = hostile_checkpoint(tmp_path / "hostile.ckpt", marker)
    message = (
        r"hostile\.ckpt.*hyper-parameter 'net' names the class 'neuromask_pl\.classifiers\.FactoryClassifier' "
        r"\(class_path\).*Three ways on.*trusted=\[the network's own classes\].*weights_only=False"
    )
    with pytest.raises(ValueError, match=message) as refused:
        LightningCheckpointClassifier(f"{__name__}.{host}", path)
    assert "trusted=['neuromask_pl" not in str(refused.value)  # a class outside the user's package: never suggested
    assert not marker.exists()


def test_weights_only_false_trusts_the_file_as_lightning_does(tmp_path):
    """The trust boundary, shown: told the file is trusted, the loader builds what it names."""
    marker = tmp_path / "the_checkpoint_ran_code"
    path = hostile_checkpoint(tmp_path / "hostile.ckpt", marker)
    clf = LightningCheckpointClassifier(f"{__name__}.TypedHost", path, weights_only=False)
    assert marker.exists() and type(clf.model.net).__name__ == "FactoryClassifier"


def test_a_trusted_class_path_is_built_and_no_other(tmp_path):
    """The allow-list covers class paths in the hyper-parameters too: listed ones are built, others refused."""
    marker = tmp_path / "the_checkpoint_ran_code"
    path = hostile_checkpoint(tmp_path / "hostile.ckpt", marker)
    with pytest.raises(ValueError, match=r"'net' names the class 'neuromask_pl\.classifiers\.FactoryClassifier'"):
        LightningCheckpointClassifier(f"{__name__}.TypedHost", path, trusted=["torch.nn.Linear"])
    assert not marker.exists()
    trusted = ["neuromask_pl.classifiers.FactoryClassifier"]
    clf = LightningCheckpointClassifier(f"{__name__}.UntypedHost", path, trusted=trusted)
    assert marker.exists() and type(clf.model.net).__name__ == "FactoryClassifier"


def test_a_nested_class_path_is_named_by_its_key(trained, tmp_path):
    marker = tmp_path / "the_checkpoint_ran_code"
    hostile = {"class_path": f"{__name__}.record_call", "init_args": {"path": str(marker)}}

    def nest(ckpt):
        ckpt["hyper_parameters"].update(
            _instantiator="pytorch_lightning.cli.instantiate_module", note={"layers": [1, {"inner": hostile}]}
        )

    path = edited_checkpoint(trained[1], tmp_path / "nested.ckpt", nest)
    with pytest.raises(ValueError, match=r"hyper-parameter 'note\.layers\[1\]\.inner' names the class"):
        LightningCheckpointClassifier(CLASS, path)
    assert not marker.exists()


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module_class", "error", "message"),
    [
        ("NoDots", ValueError, "must look like 'package.module.ClassName'"),
        ("no_such_pkg_xyz.models.LitNet", ValueError, "could not import module 'no_such_pkg_xyz.models'"),
        (f"{__name__}.NoSuchNet", ValueError, "has no attribute 'NoSuchNet'"),
        (f"{__name__}:LitNet.nope", ValueError, r"has no attribute 'LitNet\.nope'"),
        ("torch.nn.Linear", TypeError, "names a torch.nn.Module class, not a LightningModule .*FactoryClassifier"),
        ("os.getcwd", TypeError, "names builtin_function_or_method, not a LightningModule"),
    ],
)
def test_bad_module_class(trained, module_class, error, message):
    with pytest.raises(error, match=message):
        LightningCheckpointClassifier(module_class, str(trained[1]))


def test_missing_or_unreadable_checkpoint(trained, tmp_path):
    _, path = trained
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*nope.ckpt"):
        LightningCheckpointClassifier(CLASS, str(tmp_path / "nope.ckpt"))
    with pytest.raises(ValueError, match="is a directory .*consolidate it"):
        LightningCheckpointClassifier(CLASS, str(tmp_path))
    data = path.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    for name, reason in [
        ("truncated.ckpt", "failed reading zip archive"),
        ("text.ckpt", r"the safe \(weights_only\) unpickler rejected it"),
        ("empty.ckpt", r"the file ends too early \(empty or truncated\)"),
    ]:
        for weights_only in (True, False):
            message = rf"could not load .*{name}: .*is it a Lightning checkpoint"
            with pytest.raises(ValueError, match=message):
                LightningCheckpointClassifier(CLASS, str(tmp_path / name), weights_only=weights_only)
        with pytest.raises(ValueError, match=reason):
            LightningCheckpointClassifier(CLASS, str(tmp_path / name))


def test_checkpoint_without_state_dict(trained, tmp_path):
    model, _ = trained
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"plain.pt is not a Lightning checkpoint: it has no 'state_dict' \(its keys"):
        LightningCheckpointClassifier(CLASS, str(tmp_path / "plain.pt"))


def test_weights_that_do_not_fit_list_the_keys(trained, tmp_path):
    _, path = trained
    wider = edited_checkpoint(path, tmp_path / "wider.ckpt", lambda c: c["hyper_parameters"].update(num_classes=5))
    with pytest.raises(
        ValueError, match=r"shape mismatch 2: net\.6\.weight \(file \(3, 6\), model \(5, 6\)\), net\.6\.bias"
    ):
        LightningCheckpointClassifier(CLASS, wider)

    def rename(ckpt):
        ckpt["state_dict"]["net.9.weight"] = ckpt["state_dict"].pop("net.6.weight")

    renamed = edited_checkpoint(path, tmp_path / "renamed.ckpt", rename)
    with pytest.raises(ValueError, match=r"do not fit LitNet: missing 1: net\.6\.weight; unexpected 1: net\.9\.weight"):
        LightningCheckpointClassifier(CLASS, renamed)


def test_hyper_parameters_the_class_does_not_take(trained, tmp_path):
    _, path = trained
    extra = edited_checkpoint(path, tmp_path / "extra.ckpt", lambda c: c["hyper_parameters"].update(depth=2))
    with pytest.raises(ValueError, match=r"include \['depth'\], which LitNet.__init__ does not accept \(it takes"):
        LightningCheckpointClassifier(CLASS, extra)
    bare = edited_checkpoint(path, tmp_path / "bare.ckpt", lambda c: c.pop("hyper_parameters"))
    with pytest.raises(
        ValueError,
        match=r"LitNet.__init__ needs \['width'\] but the hyper-parameters .* self\.save_hyperparameters\(\)",
    ):
        LightningCheckpointClassifier(CLASS, bare)


# --- end to end ----------------------------------------------------------------------------


def test_neuromask_explains_a_checkpoint(trained, images):
    model, path = trained
    result = NeuroMask(LightningCheckpointClassifier(CLASS, str(path)), preset="paper", steps=3).explain(images)
    with torch.no_grad():
        probs = model(images).softmax(1)
    assert result.masks.shape == (3, 1, 8, 8)
    assert result.masks.min() >= 0 and result.masks.max() <= 1
    assert torch.equal(result.targets, probs.argmax(1))
    torch.testing.assert_close(result.prob_original, probs.max(1).values)


def test_trainer_predict_explains_a_checkpoint(trained, images, trainer_factory):
    """The CLI path: the checkpoint's LightningModule nested inside NeuroMask, run by a Trainer."""
    model, path = trained
    explainer = NeuroMask(LightningCheckpointClassifier(CLASS, str(path)), preset="paper", steps=3)
    batches = trainer_factory().predict(explainer, datamodule=TensorDataModule(images, batch_size=2))
    alone = NeuroMask(LightningCheckpointClassifier(CLASS, str(path)), preset="paper", steps=3).explain(images)
    assert [b.ids.tolist() for b in batches] == [[0, 1], [2]]
    assert torch.equal(torch.cat([b.masks for b in batches]), alone.masks)
    with torch.no_grad():
        assert torch.equal(torch.cat([b.targets for b in batches]), model(images).argmax(1))


def test_cli_explains_a_checkpoint_from_a_config(trained, tmp_path):
    """``neuromask-pl predict --config`` with the classifier given as class_path/init_args."""
    model, path = trained
    folder, out = tmp_path / "images", tmp_path / "out"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"img{i}.png")
    config = write_cli_config(
        tmp_path / "ckpt.yaml",
        folder,
        steps=3,
        image_size=8,
        classifier={
            "class_path": "neuromask_pl.classifiers.LightningCheckpointClassifier",
            "init_args": {"module_class": CLASS, "checkpoint": str(path)},
        },
        preset="paper",
        trainer={"default_root_dir": str(tmp_path)},
        writer={"output_dir": str(out)},
    )
    main(["predict", "--config", str(config)])

    rows = list(csv.DictReader(open(out / "manifest.csv")))
    with torch.no_grad():
        predicted = model(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255).argmax(1)
    assert [int(r["target"]) for r in rows] == predicted.tolist()
    record = json.loads((out / "run.json").read_text())["classifier"]
    assert record["class"] == "neuromask_pl.classifiers.LightningCheckpointClassifier"
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_output_from_the_command_line_is_an_index_or_a_key():
    """jsonargparse must read ``--output 0`` as the index 0, not the dict key "0"."""
    parser = ArgumentParser()
    parser.add_class_arguments(LightningCheckpointClassifier, "clf")
    required = ["--clf.module_class", CLASS, "--clf.checkpoint", "m.ckpt"]
    for given, parsed in [("0", 0), ("-1", -1), ("logits", "logits"), ("null", None)]:
        assert parser.parse_args([*required, "--clf.output", given]).clf.output == parsed


def test_trusted_from_the_command_line_is_a_list_of_class_paths():
    parser = ArgumentParser()
    parser.add_class_arguments(LightningCheckpointClassifier, "clf")
    required = ["--clf.module_class", CLASS, "--clf.checkpoint", "m.ckpt"]
    parsed = parser.parse_args([*required, "--clf.trusted", "[torch.nn.Linear, torch.nn.ReLU]"]).clf
    assert parsed.trusted == ["torch.nn.Linear", "torch.nn.ReLU"] and parsed.weights_only is True
    assert parser.parse_args(required).clf.trusted is None
