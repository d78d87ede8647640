"""AdaFactor against transformers' Adafactor (the reference), plus argument validation and state round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from deepseek_ee.optimizers import AdaFactor
from transformers.optimization import Adafactor as ReferenceAdafactor

STEPS = 20
ATOL = 1e-6

# Shapes: a matrix, a rank-3 tensor (factored over the last two dims), a vector and a scalar.
SHAPES = {"matrix": (6, 5), "rank3": (2, 3, 4), "vector": (7,), "scalar": ()}


def _make_params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype)) for shape in SHAPES.values()]


def _set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    """Deterministic gradients: a pull towards zero plus step-seeded noise, the same for both optimizers."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        noise = torch.randn(p.shape, generator=gen).to(p)  # drawn on the CPU: same values on every device
        p.grad = 0.5 * p.detach() + noise


def _run(optimizer_cls, params, steps: int, **kwargs) -> list[list[torch.Tensor]]:
    opt = optimizer_cls(params, **kwargs)
    history = []
    for step in range(steps):
        _set_grads(params, step)
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history


SETTINGS = [
    pytest.param(
        dict(relative_step=rel, warmup_init=warm, scale_parameter=scale, beta1=beta1, lr=lr), id=name
    )
    for rel, warm, lr in [(True, False, None), (True, True, None), (False, False, 1e-2)]
    for scale in (True, False)
    for beta1 in (None, 0.9)
    for name in [f"rel={rel}-warmup={warm}-scale={scale}-beta1={beta1}"]
]


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_matches_transformers_adafactor(kwargs):
    ours_params = _make_params()
    ref_params = _make_params()
    ours = _run(AdaFactor, ours_params, STEPS, **kwargs)
    ref = _run(ReferenceAdafactor, ref_params, STEPS, **kwargs)
    initial = _make_params()
    for step, (ours_step, ref_step) in enumerate(zip(ours, ref)):
        for name, a, b in zip(SHAPES, ours_step, ref_step):
            torch.testing.assert_close(
                a, b, atol=ATOL, rtol=0, msg=lambda m, n=name, s=step: f"{n} step {s}: {m}"
            )
    # Every parameter moved by far more than the tolerance (a no-op would also "match" a no-op reference).
    for p0, p in zip(initial, ours[-1]):
        assert (p - p0).abs().max() > 10 * ATOL


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_displacement_matches_transformers_in_float64(kwargs):
    """In float64 the total displacement agrees to a tight *relative* tolerance, even for tiny warm-up steps."""
    ours = _run(AdaFactor, _make_params(dtype=torch.float64), STEPS, **kwargs)[-1]
    ref = _run(ReferenceAdafactor, _make_params(dtype=torch.float64), STEPS, **kwargs)[-1]
    for p0, a, b in zip(_make_params(dtype=torch.float64), ours, ref):
        torch.testing.assert_close(a - p0, b - p0, rtol=1e-9, atol=0)


@pytest.mark.parametrize("weight_decay,clip_threshold,decay_rate", [(0.1, 1.0, -0.8), (0.0, 0.05, -0.5)])
def test_matches_transformers_other_options(weight_decay, clip_threshold, decay_rate):
    kwargs = dict(weight_decay=weight_decay, clip_threshold=clip_threshold, decay_rate=decay_rate)
    ours = _run(AdaFactor, _make_params(), STEPS, **kwargs)
    ref = _run(ReferenceAdafactor, _make_params(), STEPS, **kwargs)
    for a, b in zip(ours[-1], ref[-1]):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_matches_transformers_on_a_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    ref_model = copy.deepcopy(model)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(32, 4, generator=torch.Generator().manual_seed(2))
    opt = AdaFactor(model.parameters(), scale_parameter=False, relative_step=True)
    ref_opt = ReferenceAdafactor(ref_model.parameters(), scale_parameter=False, relative_step=True)
    losses = []
    for _ in range(STEPS):
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            o.step()
        losses.append(loss.item())
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert losses[-1] < losses[0]


def test_second_moments_are_factored_for_matrices_only():
    params = _make_params()
    opt = AdaFactor(params)
    _set_grads(params, 0)
    opt.step()
    matrix, rank3, vector, scalar = params
    assert opt.state[matrix]["exp_avg_sq_row"].shape == (6,)
    assert opt.state[matrix]["exp_avg_sq_col"].shape == (5,)
    assert "exp_avg_sq" not in opt.state[matrix]
    assert opt.state[rank3]["exp_avg_sq_row"].shape == (2, 3)
    assert opt.state[rank3]["exp_avg_sq_col"].shape == (2, 4)
    assert opt.state[vector]["exp_avg_sq"].shape == (7,)
    assert opt.state[scalar]["exp_avg_sq"].shape == ()
    assert "exp_avg" not in opt.state[vector]  # beta1=None keeps no first moment


def test_state_dict_round_trip_resumes_identically():
    straight = _make_params()
    opt = AdaFactor(straight, beta1=0.9)
    for step in range(STEPS):
        _set_grads(straight, step)
        opt.step()

    resumed = _make_params()
    first = AdaFactor(resumed, beta1=0.9)
    for step in range(STEPS // 2):
        _set_grads(resumed, step)
        first.step()
    saved = copy.deepcopy(first.state_dict())
    second = AdaFactor(resumed, beta1=0.9)
    second.load_state_dict(saved)
    for step in range(STEPS // 2, STEPS):
        _set_grads(resumed, step)
        second.step()
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bf16_parameters_are_updated_in_fp32_and_stay_bf16():
    params = [torch.nn.Parameter(torch.randn(4, 4).to(torch.bfloat16))]
    before = params[0].detach().clone()
    opt = AdaFactor(params)
    params[0].grad = torch.ones(4, 4, dtype=torch.bfloat16)
    opt.step()
    assert params[0].dtype == torch.bfloat16
    assert not torch.equal(before, params[0].detach())
    assert opt.state[params[0]]["exp_avg_sq_row"].dtype == torch.float32


def test_closure_loss_is_returned():
    param = torch.nn.Parameter(torch.ones(3))

    def closure():
        loss = (param**2).sum()
        loss.backward()
        return loss

    opt = AdaFactor([param])
    loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(3.0)
    assert torch.all(param < 1.0)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(lr=1e-3), "relative_step"),
        (dict(relative_step=False), "lr is required"),
        (dict(relative_step=False, lr=-1.0), "lr must be"),
        (dict(warmup_init=True, relative_step=False, lr=1e-3), "warmup_init"),
        (dict(eps=(1e-30,)), "eps"),
        (dict(eps=(-1.0, 1e-3)), "eps"),
        (dict(clip_threshold=0.0), "clip_threshold"),
        (dict(decay_rate=0.5), "decay_rate"),
        (dict(beta1=1.0), "beta1"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(scale_parameter="yes"), "scale_parameter"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_the_parameter(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdaFactor([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_param_group_options_are_validated():
    good = torch.nn.Parameter(torch.ones(2))
    bad = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="beta1"):
        AdaFactor([{"params": [good]}, {"params": [bad], "beta1": 2.0}])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_on_cuda(dtype):
    def params():
        return [torch.nn.Parameter(p.detach().to("cuda", dtype)) for p in _make_params()]

    ours_params, ref_params = params(), params()
    ours = _run(AdaFactor, ours_params, STEPS, beta1=0.9)
    ref = _run(ReferenceAdafactor, ref_params, STEPS, beta1=0.9)
    atol = ATOL if dtype == torch.float32 else 1e-2  # bf16 parameters round to ~3 significant digits
    for a, b in zip(ours[-1], ref[-1]):
        assert a.device.type == "cuda" and a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0)
