"""The linear probe: scikit-learn agreement, separable data, validation-only selection, folding."""

import inspect
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from src.frozen.probe import (
    DEFAULT_L2_GRID,
    fit_logistic,
    fit_probe,
    fold_standardisation,
    standardisation,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def raw(z: torch.Tensor, scale_range: float, offset: float) -> torch.Tensor:
    """Features with per-feature scales 10**(-r .. r) and offsets -offset .. offset, float32."""
    dim = z.shape[1]
    scales = torch.logspace(-scale_range, scale_range, dim)
    return (z * scales + torch.linspace(-offset, offset, dim)).float()


def blobs(
    n_train: int,
    n_val: int,
    dim: int,
    informative: int,
    noise: float,
    seed: int,
    offset: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 Gaussian classes differing in the first `informative` features; train and val splits."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.zeros(3, dim)
    centres[:, :informative] = 2 * torch.randn(3, informative, generator=generator)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 3
        return raw(centres[y] + noise * torch.randn(n, dim, generator=generator), 1, offset), y

    return (*split(n_train), *split(n_val))


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes given by argmax of a fixed linear map, samples within 0.5 of a boundary dropped."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(4 * n, 4, generator=generator)
    scores = z @ torch.tensor([[3.0, 0, 1, 0], [0, 3, 0, -1], [-3, -3, 1, 1]]).T
    top2 = scores.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1] > 0.5).nonzero().flatten()[:n]
    return raw(z[keep], 1, 20), scores[keep].argmax(dim=1)


def accuracy(fit, x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x @ fit.weight.T + fit.bias).argmax(dim=1) == y).float().mean().item()


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_matches_standard_scaler_and_scikit_learn_at_the_mapped_c(l2):
    train_x, train_y, val_x, val_y = blobs(300, 50, 5, 5, 1.5, seed=0)
    fit = fit_probe(train_x, train_y, val_x, val_y, 3, l2_grid=[l2])

    x = train_x.double().numpy()
    scaler = StandardScaler().fit(x)
    reference = LogisticRegression(C=1 / (l2 * len(x)), tol=1e-12, max_iter=10_000)
    reference.fit(scaler.transform(x), train_y.numpy())

    # weights in the standardised space (where L2 applies) agree to ~1e-5 of their size ~1
    standardised = fit.weight.double().numpy() * scaler.scale_
    np.testing.assert_allclose(standardised, reference.coef_, atol=1e-5)
    probabilities = torch.softmax(train_x.double() @ fit.weight.double().T + fit.bias, dim=1)
    np.testing.assert_allclose(
        probabilities.numpy(), reference.predict_proba(scaler.transform(x)), atol=1e-5
    )
    # the float64 solver on the standardised features agrees to the solver tolerances
    z = torch.from_numpy(scaler.transform(x))
    weight, bias = fit_logistic(z, train_y, 3, l2)
    np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=1e-6)
    np.testing.assert_allclose(bias.numpy(), reference.intercept_, atol=1e-6)


def test_separable_data_weak_l2_reaches_full_training_and_validation_accuracy():
    train_x, train_y = separable(150, seed=1)
    val_x, val_y = separable(150, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # L-BFGS converges within max_iter
        fit = fit_probe(train_x, train_y, val_x, val_y, 3, l2_grid=[1e-6])
    assert accuracy(fit, train_x, train_y) == 1.0
    assert accuracy(fit, val_x, val_y) == 1.0
    assert fit.grid[0]["val_acc"] == 1.0
    assert fit.grid[0]["train_loss"] < 1e-2


def test_accuracy_selection_breaks_ties_towards_the_stronger_regularisation():
    train_x, train_y = separable(150, seed=1)
    val_x, val_y = separable(150, seed=2)
    grid = [1e-5, 1e-3, 1e-4]
    fit = fit_probe(train_x, train_y, val_x, val_y, 3, l2_grid=grid, select="acc")
    assert [r["val_acc"] for r in fit.grid] == [1.0, 1.0, 1.0]  # a three-way tie
    assert fit.l2 == 1e-3
    assert fit_probe(train_x, train_y, val_x, val_y, 3, l2_grid=grid).l2 == 1e-5  # loss: weakest


def test_loss_selection_breaks_ties_towards_the_stronger_regularisation():
    # constant features: every strength gives the same head, zero weights and log-prior bias
    x, y = torch.full((6, 2), 3.0), torch.tensor([0, 0, 0, 1, 1, 2])
    fit = fit_probe(x, y, x, y, 3, l2_grid=[1e-3, 1e-1, 1e-2])
    assert len({r["val_loss"] for r in fit.grid}) == 1  # a three-way tie
    assert fit.l2 == 1e-1
    assert fit.weight.eq(0).all()
    log_prior = torch.tensor([3.0, 2.0, 1.0]).div(6).log()
    torch.testing.assert_close(fit.bias - fit.bias.mean(), log_prior - log_prior.mean())


def test_the_strength_is_chosen_on_the_validation_split_only():
    assert list(inspect.signature(fit_probe).parameters) == [
        "train_x", "train_y", "val_x", "val_y", "num_classes",
        "l2_grid", "select", "max_iter", "tol", "refit_tol",
    ]  # fmt: skip
    train_x, train_y, val_x, val_y = blobs(40, 300, 40, 2, 1.0, seed=0)
    honest = fit_probe(train_x, train_y, val_x, val_y, 3)
    shuffled_y = val_y[torch.randperm(len(val_y), generator=torch.Generator().manual_seed(0))]
    shuffled = fit_probe(train_x, train_y, val_x, shuffled_y, 3)

    for fit in (honest, shuffled):
        assert [r["l2"] for r in fit.grid] == sorted(DEFAULT_L2_GRID, reverse=True)
        assert fit.l2 == min(fit.grid, key=lambda r: r["val_loss"])["l2"]
    assert honest.l2 != shuffled.l2 == max(DEFAULT_L2_GRID)  # random labels: shrink the most
    # val changes only the choice: the sweep's training fits are the same
    assert [r["train_loss"] for r in honest.grid] == [r["train_loss"] for r in shuffled.grid]
    # and at one strength, shifted and rescaled val features leave the head unchanged
    one = fit_probe(train_x, train_y, val_x, val_y, 3, l2_grid=[1e-2])
    moved = fit_probe(train_x, train_y, 3 * val_x + 7, shuffled_y, 3, l2_grid=[1e-2])
    assert torch.equal(one.weight, moved.weight) and torch.equal(one.bias, moved.bias)


def test_folded_head_on_raw_features_equals_the_standardised_logits():
    train_x, train_y, val_x, val_y = blobs(200, 50, 6, 6, 1.0, seed=3, offset=20.0)
    train_x[:, 2] = 4.25  # a constant feature: weight 0 in the raw head
    fit = fit_probe(train_x, train_y, val_x, val_y, 3, l2_grid=[1e-2])

    x = train_x.double()
    mean, std = x.mean(dim=0), x.std(dim=0, correction=0)
    std[2] = 1.0
    z = (x - mean) / std
    weight, bias = fit_logistic(z, train_y, 3, 1e-2)
    standardised_logits = z @ weight.T + bias
    raw_logits = x @ fit.weight.double().T + fit.bias.double()
    torch.testing.assert_close(raw_logits, standardised_logits, rtol=0, atol=1e-4)  # float32 head
    assert fit.weight[:, 2].eq(0).all()
    assert fit.weight.dtype == fit.bias.dtype == torch.float32

    mean, scale = standardisation(train_x)
    raw_weight, raw_bias = fold_standardisation(weight, bias, mean, scale)
    torch.testing.assert_close(x @ raw_weight.T + raw_bias, standardised_logits, rtol=0, atol=1e-9)


def test_two_calls_give_identical_results():
    data = blobs(40, 100, 40, 2, 1.0, seed=0)
    first, second = fit_probe(*data, 3), fit_probe(*data, 3)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    assert first.l2 == second.l2 and first.grid == second.grid


def test_noisy_features_select_an_interior_strength_that_beats_the_weakest():
    # 40 training samples, 2 informative features out of 40: unregularised, the probe overfits
    train_x, train_y, val_x, val_y = blobs(40, 600, 40, 2, 1.0, seed=0)
    fit = fit_probe(train_x, train_y, val_x, val_y, 3)
    grid = [r["l2"] for r in fit.grid]
    assert grid[0] > fit.l2 > grid[-1]
    val_loss = {r["l2"]: r["val_loss"] for r in fit.grid}
    assert val_loss[fit.l2] < 0.7 * val_loss[grid[-1]]


def test_running_out_of_iterations_warns():
    data = blobs(40, 10, 5, 5, 1.0, seed=0)
    with pytest.warns(RuntimeWarning, match="raise max_iter"):
        fit_probe(*data, 3, l2_grid=[1e-3], max_iter=2)


X, Y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_x": X[0]}, "train_x must be a 2-D float tensor"),
        ({"train_x": X.long()}, "train_x must be a 2-D float tensor"),
        ({"val_x": X[:0], "val_y": Y[:0]}, "val split is empty"),
        ({"train_x": X[:, :0]}, "train split is empty"),
        ({"val_x": X.clone().fill_(float("nan"))}, "val_x has non-finite values"),
        ({"train_y": Y.float()}, "train_y must be a 1-D integer tensor"),
        ({"val_y": Y[:5]}, "val_y has 5 labels for 6 samples"),
        ({"train_y": Y + 1}, r"train_y labels must be in \[0, 3\), got 1 .. 3"),
        ({"val_y": Y - 1}, r"val_y labels must be in \[0, 3\)"),
        ({"val_x": X[:, :2]}, "val_x has 2 features but train_x has 3"),
        ({"train_y": Y % 2}, r"classes \[2\] have no training sample"),
        ({"num_classes": 1}, "num_classes must be an int >= 2"),
        ({"l2_grid": []}, "l2_grid is empty"),
        ({"l2_grid": [1e-2, 0.0]}, "finite and > 0"),
        ({"l2_grid": [1e-2, 1e-2]}, "duplicate"),
        ({"select": "f1"}, "select must be one of"),
        ({"max_iter": 0}, "max_iter must be >= 1"),
    ],
)
def test_invalid_inputs_raise_value_errors(change, message):
    arguments = {"train_x": X, "train_y": Y, "val_x": X, "val_y": Y, "num_classes": 3}
    with pytest.raises(ValueError, match=message):
        fit_probe(**(arguments | change))
