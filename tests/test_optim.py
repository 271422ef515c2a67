"""Optimizers and schedules, each against its formula on a toy problem, plus the config zoo
and a real (tiny, CPU) Lightning fit through `Classifier.configure_optimizers`."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch

from pipeline.config import compose
from pipeline.errors import ConfigError
from pipeline.training.lookahead import Lookahead
from pipeline.training.optim import OPTIMIZERS, build_optimizer, validate_optimizer
from pipeline.training.schedules import WarmupPlateau, build_scheduler, validate_scheduler

CONF = Path(__file__).resolve().parents[1] / "conf"
BASES = sorted(name for name, spec in OPTIMIZERS.items() if not spec.wraps)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _param(*values: float) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


def _quadratic_step(opt: torch.optim.Optimizer, w: torch.Tensor, a: float = 1.0) -> None:
    """One step on f(w) = a/2 * |w|^2, whose gradient is a * w."""
    opt.zero_grad()
    (0.5 * a * (w ** 2).sum()).backward()
    opt.step()


# ---------------------------------------------------------------------------- optimizers

def test_plain_sgd_step_is_p_minus_lr_grad():
    w = _param(2.0, -1.0)
    opt = build_optimizer([w], "sgd", lr=0.1)
    opt.zero_grad()
    (torch.tensor([3.0, 5.0], dtype=torch.float64) * w).sum().backward()  # grad = (3, 5)
    opt.step()
    assert w.tolist() == pytest.approx([2.0 - 0.1 * 3.0, -1.0 - 0.1 * 5.0], abs=1e-15)


@pytest.mark.parametrize("name", ["momentum", "nesterov"])
def test_momentum_and_nesterov_follow_their_formulas_for_two_steps(name):
    lr, mu, a, w0 = 0.1, 0.9, 2.0, 1.5
    w = _param(w0)
    opt = build_optimizer([w], name, lr=lr)
    assert opt.param_groups[0]["momentum"] == mu
    expected, b = w0, 0.0
    for step in range(2):
        g = a * expected
        b = g if step == 0 else mu * b + g         # torch: the buffer starts as the first gradient
        expected -= lr * (g + mu * b if name == "nesterov" else b)
        _quadratic_step(opt, w, a)
        assert w.item() == pytest.approx(expected, abs=1e-14)


def test_adamw_decay_is_decoupled_and_adam_l2_is_normalised():
    lr, wd = 0.1, 0.1
    wa, ww = _param(1.0), _param(1.0)
    adam = build_optimizer([wa], "adam", lr=lr, weight_decay=wd)
    adamw = build_optimizer([ww], "adamw", lr=lr, weight_decay=wd)
    for w, opt in ((wa, adam), (ww, adamw)):
        w.grad = torch.zeros_like(w)     # zero gradient: only the weight decay acts
        opt.step()
    # AdamW shrinks the weight by lr * wd * p and its Adam step on a zero gradient is 0.
    assert ww.item() == pytest.approx(1.0 - lr * wd * 1.0, abs=1e-12)
    # Adam's L2 adds wd * p to the gradient, which Adam normalises: the first step is ~lr.
    g = wd * 1.0
    assert wa.item() == pytest.approx(1.0 - lr * g / (abs(g) + 1e-8), abs=1e-12)
    assert 1.0 - wa.item() == pytest.approx(lr, rel=1e-6)


def test_adadelta_follows_zeilers_recurrence_for_three_steps():
    # Zeiler (2012), Algorithm 1, with torch's lr multiplying the update (lr = 1 is the paper).
    lr, rho, eps, a, w0 = 0.5, 0.9, 1e-6, 2.0, 1.5
    w = _param(w0)
    opt = build_optimizer([w], "adadelta", lr=lr, rho=rho, eps=eps)
    expected, eg2, edx2 = w0, 0.0, 0.0
    for _ in range(3):
        g = a * expected
        eg2 = rho * eg2 + (1 - rho) * g * g
        dx = math.sqrt(edx2 + eps) / math.sqrt(eg2 + eps) * g
        edx2 = rho * edx2 + (1 - rho) * dx * dx
        expected -= lr * dx
        _quadratic_step(opt, w, a)
        assert w.item() == pytest.approx(expected, abs=1e-14)
    assert expected < w0                                  # it moved, and downhill


def test_lookahead_moves_slow_weights_by_alpha_every_k_steps_exactly():
    # f(w) = w^2 / 2 with SGD lr 0.1: each fast step multiplies w by 0.9. k = 2, alpha = 0.5.
    w = _param(1.0)
    opt = Lookahead(torch.optim.SGD([w], lr=0.1), k=2, alpha=0.5)
    # step 1: fast 0.9; step 2: fast 0.81, slow 1 + 0.5 (0.81 - 1) = 0.905, w <- 0.905
    # step 3: fast 0.8145; step 4: fast 0.73305, slow 0.905 + 0.5 (0.73305 - 0.905) = 0.819025
    by_hand = [(0.9, 1.0), (0.905, 0.905), (0.8145, 0.905), (0.819025, 0.819025)]
    for w_expected, slow_expected in by_hand:
        _quadratic_step(opt, w)
        assert w.item() == pytest.approx(w_expected, abs=1e-15)
        assert opt.state[w]["slow"].item() == pytest.approx(slow_expected, abs=1e-15)


@pytest.mark.parametrize("k, alpha", [(1, 1.0), (3, 0.8)])
def test_lookahead_matches_its_recurrence(k, alpha):
    w = _param(2.0)
    opt = Lookahead(torch.optim.SGD([w], lr=0.2), k=k, alpha=alpha)
    fast = slow = 2.0
    for step in range(1, 10):
        fast *= 0.8
        if step % k == 0:
            slow += alpha * (fast - slow)
            fast = slow
        _quadratic_step(opt, w)
        assert w.item() == pytest.approx(fast, abs=1e-14)


@pytest.mark.parametrize("base", BASES)
def test_lookahead_wraps_every_base_and_its_state_dict_round_trips(base):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = build_optimizer([w], "lookahead", k=2, alpha=0.5, base={"name": base, "lr": 0.05})
    plain = build_optimizer([torch.nn.Parameter(w.detach().clone())], base, lr=0.05)
    assert isinstance(opt, Lookahead) and type(opt.base) is type(plain)
    assert opt.param_groups is opt.base.param_groups
    for _ in range(3):
        _quadratic_step(opt, w)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)              # as a Lightning checkpoint would
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = build_optimizer([w2], "lookahead", k=2, alpha=0.5, base={"name": base, "lr": 0.05})
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.steps == 3 and opt2.param_groups is opt2.base.param_groups
    for _ in range(5):                                # same state -> the same trajectory
        _quadratic_step(opt, w)
        _quadratic_step(opt2, w2)
    assert torch.equal(w, w2)


def test_schedulers_act_through_lookahead_on_the_inner_optimizer():
    w = _param(1.0)
    opt = build_optimizer([w], "lookahead", base={"name": "nesterov", "lr": 0.1})
    sched = build_scheduler(opt, "step", max_epochs=5, steps_per_epoch=1, step_size=1, gamma=0.5)["scheduler"]
    _quadratic_step(opt, w)
    sched.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.05)


def test_ranger_is_radam_inside_lookahead():
    torch.manual_seed(0)
    start = torch.randn(4, dtype=torch.float64)
    w1, w2 = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    settings = dict(lr=0.01, betas=(0.95, 0.999), eps=1e-5, weight_decay=0.0)
    ranger = build_optimizer([w1], "ranger", k=6, alpha=0.5, **settings)
    manual = Lookahead(torch.optim.RAdam([w2], **settings), k=6, alpha=0.5)
    assert isinstance(ranger, Lookahead) and type(ranger.base) is torch.optim.RAdam
    assert (ranger.k, ranger.alpha) == (6, 0.5)
    for _ in range(13):
        _quadratic_step(ranger, w1)
        _quadratic_step(manual, w2)
    assert torch.equal(w1, w2)


@pytest.mark.parametrize("option", _options("optimizer"))
def test_every_optimizer_config_builds_validates_and_steps(option):
    cfg = compose([f"optimizer={option}"], conf=CONF)
    validate_optimizer(dict(cfg.optimizer))
    kwargs = {k: v for k, v in cfg.optimizer.items() if k != "name"}
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model.parameters(), cfg.optimizer.name, **kwargs)
    before = model.weight.detach().clone()
    opt.zero_grad()
    model(torch.ones(5, 3)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, model.weight)


def test_the_optimizer_options_are_the_whole_zoo():
    expected = {"sgd", "momentum", "nesterov", "adagrad", "adadelta", "rmsprop", "adam", "adamw", "radam", "lookahead", "ranger"}
    assert set(_options("optimizer")) == expected == set(OPTIMIZERS)
    assert compose(["optimizer=sgd"], conf=CONF).optimizer.momentum == 0.0


def test_lookahead_base_is_a_hydra_choice_from_the_same_group():
    cfg = compose(["optimizer=lookahead", "optimizer@optimizer.base=nesterov", "optimizer.base.lr=0.2"], conf=CONF)
    assert cfg.optimizer.base.name == "nesterov" and cfg.optimizer.base.lr == 0.2
    validate_optimizer(dict(cfg.optimizer))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer=lookahead", "optimizer.k=0"], r"optimizer\.k=0 is out of range: it must be >= 1"),
        (["optimizer=lookahead", "optimizer.k=2.5"], r"optimizer\.k must be an integer"),
        (["optimizer=lookahead", "optimizer.alpha=1.5"], r"optimizer\.alpha=1\.5 is out of range"),
        (["optimizer=ranger", "optimizer.alpha=0"], r"optimizer\.alpha=0 is out of range"),
        (["optimizer=lookahead", "optimizer.base.lr=-1"], r"optimizer\.base\.lr=-1 is out of range"),
        (["optimizer=lookahead", "optimizer.base.name=lion"], r"optimizer\.base\.name='lion' is not one of"),
        (["optimizer=lookahead", "+optimizer.base.bogus=1"], r"optimizer\.base\.bogus is not an option of adam"),
        (["+optimizer.bogus=1"], r"optimizer\.bogus is not an option of adam"),
        (["optimizer=adamw", "optimizer.betas=[0.9,1.2]"], r"optimizer\.betas\.1=1\.2 is out of range"),
        (["optimizer=rmsprop", "optimizer.alpha=1.0"], r"optimizer\.alpha=1\.0 is out of range"),
        (["optimizer=nesterov", "optimizer.momentum=-0.5"], r"optimizer\.momentum=-0\.5"),
        (["optimizer=sgd", "+optimizer.nesterov=true"], r"optimizer \(sgd\) rejected its settings: Nesterov"),
        (["optimizer=adagrad", "optimizer.weight_decay=-1"], r"optimizer\.weight_decay=-1"),
        (["optimizer=adadelta", "optimizer.rho=1.5"], r"optimizer\.rho=1\.5 is out of range"),
        (["optimizer=adadelta", "+optimizer.betas=[0.9,0.99]"], r"optimizer\.betas is not an option of adadelta"),
        (["optimizer.name=lion"], r"optimizer\.name='lion' is not one of"),
    ],
)
def test_bad_optimizer_values_fail_naming_the_key(overrides, message):
    cfg = compose(overrides, conf=CONF)
    with pytest.raises(ConfigError, match=message):
        validate_optimizer(dict(cfg.optimizer))


# ---------------------------------------------------------------------------- schedules

def _lrs(name: str, epochs: int, *, lr0: float = 0.5, steps_per_epoch: int = 1, **kwargs) -> list[float]:
    """The learning rate used in each of `epochs` LambdaLR steps (after t scheduler steps)."""
    w = _param(1.0)
    opt = torch.optim.SGD([w], lr=lr0)
    config = build_scheduler(opt, name, max_epochs=epochs, steps_per_epoch=steps_per_epoch, **kwargs)
    out = []
    for _ in range(epochs * (steps_per_epoch if config["interval"] == "step" else 1)):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        config["scheduler"].step()
    return out


@pytest.mark.parametrize(
    "name, kwargs, formula",
    [
        ("exponential", {"decay": 0.3}, lambda t: 0.5 * math.exp(-0.3 * t)),
        ("inverse_time", {"decay": 0.7}, lambda t: 0.5 / (1 + 0.7 * t)),
        ("step", {"step_size": 3, "gamma": 0.5}, lambda t: 0.5 * 0.5 ** (t // 3)),
        ("multistep", {"milestones": [2, 5], "gamma": 0.1}, lambda t: 0.5 * 0.1 ** ((t >= 2) + (t >= 5))),
        ("cosine", {"min_lr_ratio": 0.1}, lambda t: 0.5 * (0.1 + 0.9 * (1 + math.cos(math.pi * t / 10)) / 2)),
        ("none", {}, lambda t: 0.5),
        ("exponential", {"decay": 0.3, "warmup_epochs": 3},
         lambda t: 0.5 * math.exp(-0.3 * t) * min(1.0, (t + 1) / 4)),
        ("cosine", {"min_lr_ratio": 0.0, "warmup_epochs": 2},
         lambda t: 0.5 * (1 + math.cos(math.pi * t / 10)) / 2 * min(1.0, (t + 1) / 3)),
    ],
)
def test_per_epoch_schedules_give_the_exact_lr_at_epoch_t(name, kwargs, formula):
    lrs = _lrs(name, 10, **kwargs)
    for t, lr in enumerate(lrs):
        assert lr == pytest.approx(formula(t), rel=1e-12, abs=1e-15), (name, t)


def test_warmup_is_a_linear_ramp_to_the_base_rate():
    assert _lrs("none", 6, lr0=1.0, warmup_epochs=3) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_onecycle_steps_per_step_and_peaks_at_the_right_step():
    lr0, epochs, spe = 0.1, 4, 10                      # 40 steps; the rise lasts 0.25 * 40 = 10
    w = _param(1.0)
    opt = torch.optim.SGD([w], lr=lr0)
    config = build_scheduler(opt, "onecycle", max_epochs=epochs, steps_per_epoch=spe, max_lr_factor=2.0,
                             pct_start=0.25, div_factor=10.0, final_div_factor=100.0)
    assert config["interval"] == "step" and "monitor" not in config
    lrs = []
    for _ in range(epochs * spe):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        config["scheduler"].step()
    peak = 2.0 * lr0
    assert max(lrs) == pytest.approx(peak) and lrs.index(max(lrs)) == 9   # torch: step pct * total - 1
    assert lrs[0] == pytest.approx(peak / 10)
    assert lrs[4] == pytest.approx(peak / 10 + (peak - peak / 10) * 4 / 9)  # linear rise
    assert lrs[-1] == pytest.approx(peak / 10 / 100)   # the last step runs at the minimum
    for _ in range(3):    # torch would extrapolate below it (negative, linear) and then raise
        config["scheduler"].step()
        assert opt.param_groups[0]["lr"] == pytest.approx(peak / 10 / 100)


def test_plateau_divides_by_ten_after_patience_epochs_without_improvement():
    w = _param(1.0)
    opt = torch.optim.SGD([w], lr=1.0)
    config = build_scheduler(opt, "plateau", max_epochs=20, steps_per_epoch=1, factor=0.1, patience=2)
    assert config["monitor"] == "val/acc" and config["interval"] == "epoch"
    sched = config["scheduler"]
    lrs = []
    for val_acc in [0.5, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7]:
        sched.step(val_acc)
        lrs.append(opt.param_groups[0]["lr"])
    # Improvements at epochs 0, 1, 5. Epochs 2 and 3 are the `patience` tolerated ones; the
    # 3rd epoch without improvement (epoch 4) divides by 10; likewise epoch 8 after epoch 5.
    assert lrs == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01])


def test_plateau_warmup_ramps_then_monitors():
    w = _param(1.0)
    opt = torch.optim.SGD([w], lr=1.0)
    sched = build_scheduler(opt, "plateau", max_epochs=20, steps_per_epoch=1, factor=0.5, patience=0,
                            warmup_epochs=2)["scheduler"]
    assert isinstance(sched, WarmupPlateau)
    lrs = [opt.param_groups[0]["lr"]]
    for val_acc in [0.1, 0.1, 0.5, 0.5]:                # ignored during warm-up, then one bad epoch
        sched.step(val_acc)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 0.5])


@pytest.mark.parametrize("option", _options("scheduler"))
def test_every_scheduler_config_builds_and_validates(option):
    cfg = compose([f"scheduler={option}"], conf=CONF)
    validate_scheduler(dict(cfg.scheduler), max_epochs=cfg.trainer.max_epochs)
    kwargs = {k: v for k, v in cfg.scheduler.items() if k != "name"}
    opt = torch.optim.Adam([_param(1.0)], lr=1e-3)
    config = build_scheduler(opt, cfg.scheduler.name, max_epochs=5, steps_per_epoch=3, **kwargs)
    assert config["interval"] == ("step" if option == "onecycle" else "epoch")
    assert ("monitor" in config) == (option == "plateau")


def test_the_scheduler_options_are_the_whole_zoo():
    expected = {"none", "step", "multistep", "exponential", "inverse_time", "cosine", "onecycle", "plateau"}
    assert set(_options("scheduler")) == expected


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["scheduler=exponential", "scheduler.decay=-1"], r"scheduler\.decay=-1 is out of range: it must be >= 0"),
        (["scheduler=inverse_time", "scheduler.decay=-0.5"], r"scheduler\.decay=-0\.5 is out of range"),
        (["scheduler=inverse_time", "scheduler.decay=fast"], r"scheduler\.decay must be a number"),
        (["scheduler=multistep", "scheduler.milestones=[30,20]"], r"scheduler\.milestones must be"),
        (["scheduler=cosine", "scheduler.min_lr_ratio=1.5"], r"scheduler\.min_lr_ratio=1\.5"),
        (["scheduler=onecycle", "scheduler.warmup_epochs=2"], r"scheduler\.warmup_epochs must be 0 for onecycle"),
        (["scheduler=onecycle", "scheduler.pct_start=0.7"], r"scheduler\.pct_start=0\.7 is out of range"),
        (["scheduler=onecycle", "scheduler.anneal_strategy=cubic"], r"scheduler\.anneal_strategy='cubic'"),
        (["scheduler=plateau", "scheduler.factor=1.0"], r"scheduler\.factor=1\.0 is out of range"),
        (["scheduler=plateau", "scheduler.patience=-1"], r"scheduler\.patience=-1"),
        (["scheduler=plateau", "scheduler.mode=up"], r"scheduler\.mode='up'"),
        (["scheduler=step", "scheduler.warmup_epochs=-1"], r"scheduler\.warmup_epochs=-1"),
        (["+scheduler.bogus=1"], r"scheduler\.bogus is not an option of step"),
        (["scheduler=exponential", "+scheduler.gamma=0.5"], r"scheduler\.gamma is not an option of exponential"),
        (["scheduler.name=warp"], r"scheduler\.name='warp' is not one of"),
    ],
)
def test_bad_scheduler_values_fail_naming_the_key(overrides, message):
    cfg = compose(overrides, conf=CONF)
    with pytest.raises(ConfigError, match=message):
        validate_scheduler(dict(cfg.scheduler), max_epochs=10)


# ------------------------------------------------------------- a real Lightning fit (CPU)

def _fit(tmp_path: Path, optimizer: dict, scheduler: dict, *, epochs: int = 2, ckpt: str | None = None):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.training.module import Classifier

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(48, 1, 4, 4, generator=g), torch.randint(0, 3, (48,), generator=g)
    train = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8)   # 4 steps per epoch
    val = DataLoader(TensorDataset(x[32:], y[32:]), batch_size=8)
    L.seed_everything(0, verbose=False)
    module = Classifier(arch="mlp", arch_kwargs=dict(in_channels=1, num_classes=3, image_size=4, hidden_sizes=[8]),
                        mean=[0.5], std=[0.25], resize=None, optimizer=optimizer, scheduler=scheduler)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val, ckpt_path=ckpt)
    return trainer


@pytest.mark.slow
def test_lightning_fit_with_onecycle_steps_every_batch(tmp_path):
    trainer = _fit(tmp_path, {"name": "adam", "lr": 0.01},
                   {"name": "onecycle", "max_lr_factor": 1.0, "pct_start": 0.25, "warmup_epochs": 0})
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == "step"
    assert config.scheduler.total_steps == 8 and config.scheduler.last_epoch == 8   # 2 epochs x 4 batches
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 / 25 / 1e4)


@pytest.mark.slow
def test_lightning_fit_with_plateau_and_lookahead_checkpoints_and_resumes(tmp_path):
    optimizer = {"name": "lookahead", "k": 3, "alpha": 0.5, "base": {"name": "momentum", "lr": 0.05}}
    scheduler = {"name": "plateau", "factor": 0.1, "patience": 0, "mode": "max"}
    trainer = _fit(tmp_path, optimizer, scheduler)
    config = trainer.lr_scheduler_configs[0]
    assert config.monitor == "val/acc" and config.interval == "epoch"
    assert config.scheduler.last_epoch == 2                   # stepped once per epoch, on val/acc
    opt = trainer.optimizers[0]
    assert isinstance(opt, Lookahead) and opt.steps == 8
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["optimizer_states"][0]
    assert set(saved) >= {"base", "slow", "step"} and saved["step"] == 8
    resumed = _fit(tmp_path, optimizer, scheduler, epochs=3, ckpt=str(path))
    assert resumed.optimizers[0].steps == 12
    assert resumed.lr_scheduler_configs[0].scheduler.last_epoch == 3
    assert copy.deepcopy(resumed.optimizers[0]).steps == 12
