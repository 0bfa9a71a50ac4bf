"""The ``psgd`` command: the only module that imports click.

Every option can also come from an environment variable ``PSGD_<OPTION>`` (upper case,
dashes as underscores), and a whole training run from ``--config FILE`` (JSON, the
form written to a run directory's config.json); options given explicitly win.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click

from .config import ALGORITHMS, CONSISTENCY, INNER_SCHEDULES, STALENESS_RULES, TRANSPORTS, TrainConfig, default_workers
from .data.augment import DistortionSpec
from .errors import ColdStop, Interrupted, PsgdError
from .model.functions import ACTIVATIONS, LOSSES
from .model.momentum_rule import MOMENTUM_RULES
from .model.network import ModelSpec, parse_sizes
from .model.optim import OPTIMIZERS, OptimizerSpec
from .model.schedules import SCHEDULES, ScheduleSpec
from .wire.codecs import CODECS


class PsgdGroup(click.Group):
    """Turns any PsgdError into a one-line message and exit status 2, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PsgdError as exc:
            click.echo(f"psgd: error: {exc}", err=True)
            ctx.exit(2)
        except OSError as exc:  # the machine's, not psgd's: a full disk, a folder it may not write
            click.echo(f"psgd: error: {exc}", err=True)
            ctx.exit(2)
        except Interrupted as exc:  # a signal before anything worth keeping was done
            click.echo(f"psgd: {exc}", err=True)
            ctx.exit(INTERRUPTED_STATUS)
        except ColdStop:  # a second Ctrl-C (the first stops a run warm)
            click.echo("\npsgd: stopped at once (a second Ctrl-C); a cluster's servers keep their newest checkpoint",
                       err=True)
            ctx.exit(INTERRUPTED_STATUS)
        except KeyboardInterrupt:  # a first Ctrl-C before the command took over Ctrl-C (or one that never does)
            click.echo("\npsgd: interrupted", err=True)
            global _exit_at_once
            _exit_at_once = True
            ctx.exit(INTERRUPTED_STATUS)


# Set when a KeyboardInterrupt was caught: main() then leaves with os._exit(130). A Ctrl-C
# that lands while CPython runs code through its PyRun_* entry points (as some extension
# modules do at import) sets CPython's "unhandled KeyboardInterrupt" flag even though psgd
# handled it, and a normal exit then kills the process with SIGINT: status -2, not 130
# (seen about once in 40 Ctrl-Cs during start-up, traced with strace: exit_sigint's
# kill(getpid(), SIGINT) after finalization). The exception has already unwound every
# `with` and `finally` on its way here: nothing is left to clean up but the streams.
_exit_at_once = False


INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def _given_args(ctx: click.Context, exclude: set[str]) -> list[str]:
    """The command-line options given to this command, as arguments again (options that
    came from PSGD_* variables reach a child through its environment)."""
    args = []
    for param in ctx.command.params:
        if param.name in exclude or not isinstance(param, click.Option) or \
                ctx.get_parameter_source(param.name) is not click.core.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if param.is_flag:
            if param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                args.append(param.opts[0])
        else:
            args += [param.opts[0], str(value)]
    return args


def _group_args(ctx: click.Context) -> list[str]:
    """The -v/-q given to ``psgd`` itself."""
    params = ctx.parent.params if ctx.parent is not None else {}
    return ["-v"] * params.get("verbose", 0) + ["-q"] * params.get("quiet", 0)


class EnvOption(click.Option):
    """An option that also reads PSGD_<NAME>: a bad value from the environment names the
    variable it came from (click names only the option, which the user never typed)."""

    def process_value(self, ctx, value):
        try:
            return super().process_value(ctx, value)
        except click.BadParameter as exc:
            if ctx.get_parameter_source(self.name) is click.core.ParameterSource.ENVIRONMENT:
                exc.message = f"{exc.message} (from the environment variable {self.envvar})"
            raise


def env_option(*decls, **kwargs):
    """A click option that also reads PSGD_<NAME> from the environment."""
    name = next(d for d in decls if d.startswith("--")).lstrip("-").split("/")[0]
    kwargs.setdefault("envvar", "PSGD_" + name.upper().replace("-", "_"))
    kwargs.setdefault("show_default", True)
    kwargs.setdefault("cls", EnvOption)
    return click.option(*decls, **kwargs)


@click.group(cls=PsgdGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="psgd")
@click.option("-v", "--verbose", count=True, help="More log lines (repeatable); PSGD_LOG_LEVEL sets the level too.")
@click.option("-q", "--quiet", count=True, help="Fewer log lines (repeatable).")
@click.pass_context
def cli(ctx, verbose, quiet):
    """psgd: asynchronous SGD on a parameter server (Downpour), for multi-layer perceptrons."""
    from . import log
    try:
        level = log.level_from(verbose, quiet)
    except ValueError as exc:
        raise PsgdError(str(exc)) from None
    log.setup(ctx.invoked_subcommand or "psgd", level)


# --- shared option sets ----------------------------------------------------------------

def data_options(f):
    f = env_option("--data-dir", type=click.Path(file_okay=False), default=None,
                   help="Folder holding MNIST (or where to fetch it). Default: the user cache, ~/.cache/psgd.")(f)
    f = env_option("--data", default="mnist", help="'mnist' or the path of an .npz with arrays X and y.")(f)
    return f


_DEFAULT = TrainConfig()
CONV_DEFAULT_LR = 0.03  # a convolutional network's rate when --lr is not given
LOCAL_ADAM_DEFAULT_LR = 0.002  # local SGD's inner Adam/AdamW rate when --lr is not given (README, "Thin links")


def training_options(f):
    opts = [
        env_option("--config", "config_file", type=click.Path(dir_okay=False, exists=True), default=None,
                   envvar="PSGD_CONFIG", help="A JSON run configuration; options given here override it."),
        env_option("--layers", default=",".join(map(str, _DEFAULT.model.sizes)), help="Layer sizes, input to output."),
        env_option("--model", "model_name", default="mlp",
                   help="mlp (--layers), lenet5, or a user's model as package.module:factory."),
        env_option("--arch", default=None, help="A conv stack, e.g. conv5x5x6same,pool2,conv5x5x16,pool2,120,84,10."),
        env_option("--pool", type=click.Choice(["max", "avg"]), default="max", help="lenet5: max or average pooling."),
        env_option("--activation", type=click.Choice(list(ACTIVATIONS)), default=_DEFAULT.model.hidden, help="Hidden units."),
        env_option("--loss", type=click.Choice(list(LOSSES)), default=_DEFAULT.model.loss,
                   help="Output and error: softmax_ce (classes), bce (0/1 targets), sse (regression)."),
        env_option("--dtype", type=click.Choice(["float32", "float64"]), default=_DEFAULT.model.dtype),
        env_option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default=_DEFAULT.optimizer.name),
        env_option("--momentum", type=float, default=_DEFAULT.optimizer.momentum),
        env_option("--weight-decay", type=float, default=_DEFAULT.optimizer.weight_decay,
                   help="L2 coefficient (adamw: decoupled decay of the weights)."),
        env_option("--beta1", type=float, default=_DEFAULT.optimizer.beta1, help="adam/adamw: first-moment decay."),
        env_option("--beta2", type=float, default=_DEFAULT.optimizer.beta2, help="adam/adamw: second-moment decay."),
        env_option("--lr", type=float, default=_DEFAULT.schedule.lr,
                   help=f"Learning rate (a0 of the schedule); a conv net's default is {CONV_DEFAULT_LR}, local SGD's "
                        f"inner Adam/AdamW's {LOCAL_ADAM_DEFAULT_LR}."),
        env_option("--schedule", type=click.Choice(list(SCHEDULES)), default=_DEFAULT.schedule.name),
        env_option("--lr-tau", type=float, default=_DEFAULT.schedule.tau, help="diminishing: a0/(1+k/tau)."),
        env_option("--lr-every", type=int, default=_DEFAULT.schedule.every, help="step: updates between drops."),
        env_option("--lr-factor", type=float, default=_DEFAULT.schedule.factor, help="step/plateau: multiply by this."),
        env_option("--lr-patience", type=int, default=_DEFAULT.schedule.patience, help="plateau: evaluations without gain."),
        env_option("--warmup", type=int, default=None, show_default=False,
                   help="Updates of linear warm-up. [default: a tenth of the run, at most 500]"),
        env_option("--batch-size", type=int, default=_DEFAULT.batch_size),
        env_option("--epochs", type=float, default=_DEFAULT.epochs),
        env_option("--seed", type=int, default=_DEFAULT.seed),
        env_option("--validation", type=int, default=None, show_default=False,
                   help="Examples held out for validation. [default: a tenth of the training set, at most 5000]"),
        env_option("--dropout", type=float, default=_DEFAULT.dropout),
        env_option("--augment/--no-augment", default=_DEFAULT.augment, help="Random 2-pixel shifts of images."),
        env_option("--distort-rotate", type=float, default=0.0, help="Random rotation of images, up to this many degrees."),
        env_option("--distort-scale", type=float, default=0.0, help="Random stretch of each image axis by up to this fraction."),
        env_option("--distort-shear", type=float, default=0.0, help="Random shear of images, up to this factor."),
        env_option("--distort-shift", type=float, default=0.0, help="Random translation of images, up to this many pixels."),
        env_option("--distort-noise", type=float, default=0.0, help="Additive Gaussian pixel noise of this deviation."),
        env_option("--target-accuracy", type=float, default=None, help="Stop once validation accuracy reaches this."),
        env_option("--evals-per-epoch", type=int, default=_DEFAULT.evals_per_epoch),
        env_option("--staleness-rule", type=click.Choice(STALENESS_RULES), default=_DEFAULT.staleness_rule,
                   help="Treat a push of staleness s: none, divide (lr/s), dynsgd (lr/(s+1)), "
                        "dcasgd (delay compensation, with --optimizer sgd)."),
        env_option("--momentum-rule", type=click.Choice(list(MOMENTUM_RULES)), default=_DEFAULT.momentum_rule,
                   help="adaptive: the server lowers the momentum (raising the rate to match) as the staleness "
                        "it measures grows, for momentum/nesterov under async and ssp; fixed: as configured."),
        env_option("--dc-lambda", type=float, default=_DEFAULT.dc_lambda, help="dcasgd: lambda."),
        env_option("--consistency", type=click.Choice(CONSISTENCY), default=_DEFAULT.consistency,
                   help="async (Downpour), ssp (bounded staleness) or sync (averaged, with a barrier)."),
        env_option("--ssp-bound", type=int, default=_DEFAULT.ssp_bound, help="ssp: clocks a worker may lead by."),
        env_option("--overlap/--no-overlap", default=_DEFAULT.overlap,
                   help="Workers compute the next step while a push travels (gradients one step older)."),
        env_option("--max-staleness", type=int, default=None,
                   help="Refuse a push staler than this (its worker pulls fresh weights). "
                        "Default: 4 x connected workers + 16; 0: no bound."),
        env_option("--outlier-k", type=float, default=_DEFAULT.outlier_k,
                   help="Refuse a push whose gradient norm exceeds k x the median of the last "
                        "--outlier-window accepted pushes (after a warm-up of 20); 0: no guard."),
        env_option("--outlier-window", type=int, default=_DEFAULT.outlier_window,
                   help="Accepted pushes the outlier guard's median runs over."),
        env_option("--on-divergence", type=click.Choice(["stop", "rollback"]), default=_DEFAULT.on_divergence,
                   help="A diverged run stops with an error, or rolls every server back to the last validated "
                        "weights and goes on at a lower rate."),
        env_option("--rollback-factor", type=float, default=_DEFAULT.rollback_factor,
                   help="rollback: multiply the learning rate by this at each rollback, in (0, 1)."),
        env_option("--max-rollbacks", type=int, default=_DEFAULT.max_rollbacks,
                   help="rollback: give up (as stop) after this many."),
        env_option("--lease", "lease_s", type=float, default=_DEFAULT.lease_s,
                   help="Seconds of silence after which a worker leaves barriers and statistics."),
        env_option("--slow-worker", type=float, default=_DEFAULT.slow_worker,
                   help="Make the last local worker this many times slower (to study stragglers)."),
        env_option("--push-codec", type=click.Choice(list(CODECS)), default=_DEFAULT.push_codec,
                   help="Compress pushes on the ZeroMQ wire: float16, int8 (per-block scale) or topk "
                        "(with error feedback); a run with a codec uses ZeroMQ, not shared memory."),
        env_option("--pull-codec", type=click.Choice(["none", "float16", "int8"]), default=_DEFAULT.pull_codec,
                   help="Compress the weights workers pull."),
        env_option("--topk-fraction", type=float, default=_DEFAULT.topk_fraction,
                   help="topk: the fraction of a push's elements sent."),
        env_option("--algorithm", type=click.Choice(list(ALGORITHMS)), default=_DEFAULT.algorithm,
                   help="downpour (push gradients) or local (local SGD / DiLoCo: push the change of "
                        "--local-steps inner steps; --lr is then the inner rate)."),
        env_option("--local-steps", type=int, default=_DEFAULT.local_steps, help="local: inner steps per push (H)."),
        env_option("--inner-optimizer", type=click.Choice(list(OPTIMIZERS)), default=_DEFAULT.inner_optimizer,
                   help="local: the workers' optimizer (with --momentum, --beta1/2, --weight-decay)."),
        env_option("--outer-lr", type=float, default=_DEFAULT.outer_lr, help="local: the server's (outer) rate."),
        env_option("--outer-momentum", type=float, default=_DEFAULT.outer_momentum,
                   help="local: the server's Nesterov momentum (0: plain SGD). [default: 0.9 under sync, "
                        "0.5 under async]"),
        env_option("--dynamic-local-steps/--fixed-local-steps", default=_DEFAULT.dynamic_local_steps,
                   help="local: scale each worker's H to its speed (the fastest takes --local-steps); ZeroMQ only."),
        env_option("--inner-schedule", type=click.Choice(list(INNER_SCHEDULES)), default=_DEFAULT.inner_schedule,
                   help="local: the inner rate stays at --lr (constant), or follows the run's --schedule (run; with "
                        "its warm-up) at the run's progress in Downpour's updates, examples / --batch-size; told in "
                        "each ack, so ZeroMQ only."),
        env_option("--outer-every", type=int, default=None,
                   help="local, async: pushes between moves of the outer momentum (delayed Nesterov). "
                        "[default: the number of workers]"),
        env_option("--max-updates", type=int, default=None, help="Stop after this many applied updates."),
        env_option("--max-seconds", type=float, default=None, help="Stop after this many seconds."),
        env_option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/latest",
                   help="Run directory: weights, metrics.jsonl, summary.json, config.json."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return data_options(f)


def build_config(ctx: click.Context, **kw) -> TrainConfig:
    """A TrainConfig from a config file (if any) overridden by explicitly given options."""
    from_file = kw.get("config_file") is not None
    base = TrainConfig.from_dict(read_json(Path(kw["config_file"])), kw["config_file"]) if from_file else _DEFAULT

    def given(name):
        return not from_file or ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT

    def pick(name, current):
        return kw[name] if given(name) else current

    model = build_model_spec(kw, ctx, given, base.model)
    optimizer = OptimizerSpec(pick("optimizer", base.optimizer.name), pick("momentum", base.optimizer.momentum),
                              pick("weight_decay", base.optimizer.weight_decay), base.optimizer.adagrad_eps,
                              pick("beta1", base.optimizer.beta1), pick("beta2", base.optimizer.beta2),
                              base.optimizer.adam_eps)
    lr = pick("lr", base.schedule.lr)
    lr_not_given = "lr" in kw and ctx.get_parameter_source("lr") is click.core.ParameterSource.DEFAULT and not from_file
    if lr_not_given and kw.get("algorithm") == "local" and kw.get("inner_optimizer") in ("adam", "adamw"):
        lr = LOCAL_ADAM_DEFAULT_LR  # 0.1 is SGD's rate: AdamW's inner steps would throw the weights about
    elif lr_not_given and model.arch:
        lr = CONV_DEFAULT_LR  # the MLP's 0.1 diverges LeNet-5 (to 11% in epoch 2); 0.03 reached 99.04%
    schedule = ScheduleSpec(pick("schedule", base.schedule.name), lr,
                            pick("lr_tau", base.schedule.tau), pick("lr_every", base.schedule.every),
                            pick("lr_factor", base.schedule.factor), pick("lr_patience", base.schedule.patience),
                            pick("warmup", base.schedule.warmup))
    fields = ["data", "data_dir", "batch_size", "epochs", "seed", "validation", "dropout", "augment",
              "target_accuracy", "evals_per_epoch", "out_dir", "workers", "servers", "curve", "n_fetch", "n_push", "overlap", "transport",
              "staleness_rule", "momentum_rule", "dc_lambda", "consistency", "ssp_bound", "lease_s", "max_staleness", "outlier_k", "outlier_window", "on_divergence",
              "rollback_factor", "max_rollbacks", "slow_worker", "max_updates", "push_codec", "pull_codec", "topk_fraction",
              "algorithm", "local_steps", "inner_optimizer", "outer_lr", "outer_momentum", "outer_every", "dynamic_local_steps", "inner_schedule",
              "max_seconds"]
    changes = {name: pick(name, getattr(base, name)) for name in fields if name in kw}
    distort = DistortionSpec(**{k: pick(f"distort_{k}", getattr(base.distort, k))
                                for k in ("rotate", "scale", "shear", "shift", "noise")})
    return base.with_(model=model, optimizer=optimizer, schedule=schedule, distort=distort, **changes)


def build_model_spec(kw: dict, ctx: click.Context, given, base: ModelSpec) -> ModelSpec:
    """The model from --model/--arch/--layers; one given explicitly wins over a config file's."""
    from .model import arch as arch_mod

    def explicit(name):
        return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)

    hidden, loss, dtype = (kw["activation"] if given("activation") else base.hidden,
                           kw["loss"] if given("loss") else base.loss, kw["dtype"] if given("dtype") else base.dtype)
    name = kw.get("model_name") or "mlp"
    chosen = [opt for opt, ok in (("--model", explicit("model_name") and name != "mlp"),
                                  ("--arch", explicit("arch") and kw.get("arch")), ("--layers", explicit("layers"))) if ok]
    if len(chosen) > 1:
        raise PsgdError(f"give one of {' or '.join(chosen)}, not both")
    if explicit("arch") and kw.get("arch"):
        return ModelSpec.from_arch(kw["arch"], hidden, loss, dtype)
    if explicit("model_name") and name != "mlp":
        if ":" in name:
            return ModelSpec(base.sizes, hidden, loss, dtype, factory=name)
        return ModelSpec.from_arch(arch_mod.named(name, kw.get("pool") or "max"), hidden, loss, dtype)
    if explicit("layers") or explicit("model_name") or not (base.arch or base.factory):
        return ModelSpec(parse_sizes(kw["layers"]) if given("layers") else base.sizes, hidden, loss, dtype)
    if base.arch:
        return ModelSpec.from_arch(base.arch, hidden, loss, dtype)
    return ModelSpec(base.sizes, hidden, loss, dtype, factory=base.factory)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PsgdError(f"cannot read {path} as JSON: {exc}") from None


# --- progress ---------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on a terminal; plain evaluation lines otherwise."""

    WIDTH = 30

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total = 1
        self.last_eval = ""

    def __call__(self, kind, info):
        if kind == "start":
            self.total = max(1, info["total_examples"])
        elif kind == "progress" and self.tty:
            frac = min(1.0, info["examples"] / self.total)
            bar = "#" * int(frac * self.WIDTH)
            loss = f"loss {info['loss']:.4f} " if info.get("loss") is not None else ""
            self.stream.write(f"\r[{bar:<{self.WIDTH}}] {frac:4.0%} {loss}{self.last_eval}\x1b[K")
            self.stream.flush()
        elif kind == "eval":
            acc = info.get("val_accuracy")
            self.last_eval = f"val acc {acc:.2%}" if acc is not None else f"val loss {info['val_loss']:.4f}"
            train_loss = f"train loss {info['train_loss']:.4f}  " if info.get("train_loss") is not None else ""
            line = (f"epoch {info['epoch']:5.2f}  updates {info['updates']:6d}  lr {info['lr']:.4g}  "
                    f"{train_loss}val loss {info['val_loss']:.4f}"
                    + (f"  val acc {acc:.2%}" if acc is not None else ""))
            if "staleness_mean" in info:
                line += f"  staleness {info['staleness_mean']:.2f}"
            self.stream.write(("\r\x1b[K" if self.tty else "") + line + "\n")
            self.stream.flush()


def print_summary(summary: dict) -> None:
    acc = summary.get("test_accuracy")
    if acc is not None:
        click.echo(f"test accuracy {acc:.2%} (test loss {summary['test_loss']:.4f})")
    else:
        click.echo(f"test loss {summary['test_loss']:.6f}")
    click.echo(f"{summary['examples']} examples, {summary['updates']} updates in {summary['train_time']:.2f} s of training "
               f"({summary['examples_per_s'] / 1e3:.1f}k examples/s), {summary['wall_time']:.2f} s in all")
    for line in summary.get("report", []):
        click.echo(line)


def say_where_the_run_went(out_dir, summary: dict) -> None:
    """``run written to DIR``; or, if files of it could not be written (a full disk), which,
    and exit status 1: the run trained, but what it was for did not reach the disk."""
    if not out_dir:
        return
    unwritten = summary.get("unwritten") or []
    if not unwritten:
        click.echo(f"run written to {out_dir}")
        return
    why = summary["write_failures"][-1].rsplit(": ", 1)[-1] if summary.get("write_failures") else "see above"
    click.echo(f"psgd: error: could not write {', '.join(unwritten)} to {out_dir} ({why})", err=True)
    sys.exit(1)


DASHBOARD_DEFAULT = "127.0.0.1:8050"


def _check_address(ctx, param, value):
    """A bad [HOST:]PORT is said at once, before any data is loaded or process started."""
    if value is not None:
        from .coordinator.dashboard import parse_address
        try:
            parse_address(value)
        except PsgdError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def dashboard_options(f):
    f = env_option("--dashboard-hold", type=float, default=0.0,
                   help="Serve the finished run this many seconds more (a last Prometheus scrape).")(f)
    f = env_option("--dashboard", is_flag=False, flag_value=DASHBOARD_DEFAULT, default=None, metavar="[HOST:]PORT",
                   show_default=False, callback=_check_address,
                   help=f"Serve a live page of the run and Prometheus /metrics (alone: {DASHBOARD_DEFAULT}; "
                        "a bare PORT listens on 127.0.0.1; port 0: any free one).")(f)
    return f


def client_curve_options(f):
    f = env_option("--curve-server-key", type=click.Path(dir_okay=False, exists=True), default=None,
                   help="CURVE: the server's public key file (NAME.key from psgd keygen).")(f)
    f = env_option("--curve-key", type=click.Path(dir_okay=False, exists=True), default=None,
                   help="CURVE: this client's secret key file (NAME.key_secret); its NAME.key must be in "
                        "the server's --curve-allow folder.")(f)
    return f


# --- commands ---------------------------------------------------------------------------

@cli.command()
@training_options
@env_option("--workers", type=int, default=None, show_default=False,
            help="0: train in this process; N: a local cluster of N workers. [default: one per CPU, at most 4]")
@env_option("--servers", type=int, default=_DEFAULT.servers,
            help="Server shards of a local cluster, each holding one range of the parameters.")
@env_option("--curve/--no-curve", default=_DEFAULT.curve,
            help="Encrypt and authenticate the local cluster's ZeroMQ traffic (CURVE, keys made for the run).")
@env_option("--n-fetch", type=int, default=_DEFAULT.n_fetch, help="Pull weights every n steps (Downpour).")
@env_option("--n-push", type=int, default=_DEFAULT.n_push, help="Push the summed gradient every n steps (Downpour).")
@env_option("--transport", type=click.Choice(TRANSPORTS), default=_DEFAULT.transport,
            help="How local workers push: auto (shared memory), shm, or zmq (the network path).")
@env_option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True), default=None,
            help="Go on with the cluster run in this directory from its newest checkpoint.")
@env_option("--keep-timings", is_flag=True, default=False,
            help="Keep every step's timings of each worker and every push's of the server in RUN_DIR/timing "
                 "(psgd.simulate.calibrate replays them; a few hundred KB per worker and 10,000 pushes). "
                 "Downpour workers only: a local-SGD worker's rounds are not traced.")
@dashboard_options
@click.pass_context
def train(ctx, resume_dir, keep_timings, dashboard, dashboard_hold, **kw):
    """Train a network on a local cluster (--workers N) or in this process (--workers 0)."""
    if resume_dir:
        kw["config_file"] = str(Path(resume_dir) / "config.json")
        kw["out_dir"] = resume_dir
    if kw["workers"] is None and kw.get("config_file") is None:  # with a file, the file's value stands
        kw["workers"] = default_workers()
    config = build_config(ctx, **kw)
    if resume_dir:
        config = config.with_(out_dir=resume_dir)
    if resume_dir and config.workers == 0:
        raise PsgdError("only cluster runs (--workers N) write checkpoints to resume from")
    progress = Progress()
    if dashboard is not None and config.workers == 0:
        raise PsgdError("--dashboard watches a cluster run: give --workers N (N >= 1)")
    if config.workers == 0:
        from .launch import WarmThenCold
        from .trainer import train_single
        interrupt = WarmThenCold()
        try:
            summary = train_single(config, progress, interrupt.requested)
        finally:
            interrupt.restore()
    else:
        from .launch import train_cluster
        summary = train_cluster(config, progress, resume=resume_dir is not None, dashboard=dashboard,
                                dashboard_hold=dashboard_hold, keep_timings=keep_timings)
    print_summary(summary)
    say_where_the_run_went(config.out_dir, summary)
    if summary.get("stop_reason") == "interrupted":
        if config.workers and config.out_dir:
            click.echo(f"resume with: psgd train --resume {config.out_dir}")
        ctx.exit(INTERRUPTED_STATUS)


@cli.command()
@training_options
@env_option("--workers", type=int, default=100, help="Simulated workers, 1 to 10,000.")
@env_option("--n-fetch", type=int, default=_DEFAULT.n_fetch, help="Pull weights every n steps (a multiple of --n-push).")
@env_option("--n-push", type=int, default=_DEFAULT.n_push, help="Push the summed gradient every n steps.")
@env_option("--transport", type=click.Choice(TRANSPORTS), default=_DEFAULT.transport,
            help="zmq: the weights ride in the ack; auto/shm: the worker reads them when the ack arrives.")
@env_option("--compute", default="lognormal:2ms:0.3", show_default=True,
            help="One step's compute time: 2ms, exp:2ms or lognormal:2ms:SIGMA.")
@env_option("--delay", default="0.1ms", show_default=True, help="One message's network delay (same forms).")
@env_option("--server-time", default="0", show_default=True, help="The server's time per push (one queue).")
@env_option("--stragglers", type=int, default=0, help="The last this many workers are stragglers.")
@env_option("--straggler-factor", type=float, default=4.0, show_default=True,
            help="How many times slower a straggler computes.")
@env_option("--mtbf", type=float, default=None, help="A worker dies after an exponential time of this mean (virtual s).")
@env_option("--downtime", default="1s", show_default=True, help="... and comes back after this long.")
@env_option("--cores", type=int, default=0, help="CPU cores the workers share (0: one each).")
@env_option("--memory-limit-mb", type=float, default=4096.0, show_default=True,
            help="Refuse a run whose in-flight weight copies could exceed this.")
@env_option("--replay", "replay_dir", type=click.Path(file_okay=False, exists=True), default=None,
            help="A finished run of psgd train --keep-timings: simulate it again, fed its measured step and "
                 "round-trip times and its rates, with its configuration (every option above but --out is "
                 "ignored; default --out: RUN_DIR-replay), and compare the two.")
@click.pass_context
def simulate(ctx, compute, delay, server_time, stragglers, straggler_factor, mtbf, downtime, cores, memory_limit_mb,
             replay_dir, **kw):
    """Simulate N workers on virtual time: real gradients, the server's own rules, one process.

    Writes the same run directory as psgd train (times in it are virtual seconds), so
    psgd report reads and compares it with real runs. Same seed, same run. For speed,
    run it with OPENBLAS_NUM_THREADS=1: its gradients are small and one at a time."""
    from .simulate import Dist, SimSpec
    from .simulate import simulate as run_simulation
    if replay_dir is not None:
        given = ctx.get_parameter_source("out_dir") is not click.core.ParameterSource.DEFAULT
        replay(replay_dir, kw["out_dir"] if given else None)
        return
    config = build_config(ctx, **kw)
    spec = SimSpec(compute=Dist.parse(compute), delay=Dist.parse(delay), server=Dist.parse(server_time),
                   stragglers=stragglers, straggler_factor=straggler_factor, mtbf_s=mtbf, downtime=Dist.parse(downtime),
                   cores=cores, memory_limit_mb=memory_limit_mb)
    summary = run_simulation(config, spec, Progress())
    print_summary(summary)
    say_where_the_run_went(config.out_dir, summary)


def replay(real_dir: str, out_dir: str | None) -> None:
    """psgd simulate --replay: the real run again, on its own timeline, and how close it came."""
    from .simulate import simulate as run_simulation
    from .simulate.calibrate import compare, measured_spec, replay_config
    out = out_dir or str(Path(real_dir).resolve()) + "-replay"
    config = replay_config(real_dir, out)
    summary = run_simulation(config, measured_spec(real_dir), Progress())
    print_summary(summary)
    say_where_the_run_went(config.out_dir, summary)
    c = compare(real_dir, out)
    real_s, sim_s = c["real_staleness"], c["sim_staleness"]
    click.echo(f"replay of {real_dir}: staleness mean {real_s['mean']:.2f} real, {sim_s['mean']:.2f} simulated "
               f"(total-variation distance {c['tv']:.3f}); test accuracy {c['real_accuracy']:.2%} real, "
               f"{c['sim_accuracy']:.2%} simulated")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@data_options
@env_option("--split", type=click.Choice(["test", "train"]), default="test")
def evaluate(model, data, data_dir, split):
    """Print loss and accuracy of saved weights (a run's weights.npz) on a data set."""
    from .data import load
    from .model.modelio import load_model
    from .model.interface import build_model
    spec, params, _ = load_model(Path(model))
    train_set, test_set = load(data, data_dir)
    dataset = test_set if split == "test" else train_set
    n_out = dataset.n_outputs_for(spec.loss)
    if not spec.factory and (spec.sizes[0] != dataset.n_inputs or spec.sizes[-1] != n_out):
        raise PsgdError(f"model {','.join(map(str, spec.sizes))} does not fit {dataset.name} "
                        f"({dataset.n_inputs} inputs, {n_out} outputs)")
    net = build_model(spec)
    loss, acc = net.evaluate(params, dataset.X.astype(net.dtype), dataset.targets_for(spec.loss))
    click.echo(f"{split} loss {loss:.4f}" + (f"  accuracy {acc:.2%}" if acc is not None else "")
               + f"  ({len(dataset)} examples)")


@cli.command()
@env_option("--seed", type=int, default=0)
def gradcheck(seed):
    """Check backpropagation against central finite differences: every MLP combination,
    and convolution (both paddings), both poolings and a small conv net."""
    from .model.gradcheck import TOLERANCE, check_all, check_all_conv
    results = check_all(seed)
    click.echo(f"{'hidden':<10} {'loss':<12} {'relative error':>15}  ok (< {TOLERANCE:g})")
    for r in results:
        click.echo(f"{r.hidden:<10} {r.loss:<12} {r.relative_error:15.3e}  {'yes' if r.ok else 'NO'}")
    conv = check_all_conv(seed)
    click.echo(f"{'conv stack':<50} {'hidden':<6} {'relative error':>15}")
    for r in conv:
        click.echo(f"{r.arch:<50} {r.hidden:<6} {r.relative_error:15.3e}  {'yes' if r.ok else 'NO'}")
    results = results + conv
    bad = [r for r in results if not r.ok]
    if bad:
        click.echo(f"{len(bad)} of {len(results)} combinations FAILED", err=True)
        sys.exit(1)
    click.echo(f"all {len(results)} combinations pass")


@cli.command()
@env_option("--data-dir", type=click.Path(file_okay=False), default=None, help="Default: the user cache.")
@env_option("--mirror", "mirrors", multiple=True, help="A mirror base URL (repeatable); default: the known mirrors.")
def fetch(data_dir, mirrors):
    """Download MNIST into the data folder, verified against the original release."""
    from .data import mnist
    target = mnist.fetch(Path(data_dir) if data_dir else None, mirrors or mnist.MIRRORS, log=click.echo)
    click.echo(f"MNIST is in {target} and verified")


@cli.command()
@training_options
@env_option("--bind", default=None, show_default=False,
            help="ZeroMQ endpoint to listen on (port 0: any free port). [default: tcp://*:5555 with CURVE keys, "
                 "else tcp://127.0.0.1:5555]")
@env_option("--insecure", is_flag=True, default=False,
            help="Allow listening on a non-loopback address without CURVE: anyone who reaches the port can then "
                 "change the weights or end the run.")
@env_option("--shard", "server_shard", type=int, default=0, help="Which range of the parameters this server holds.")
@env_option("--num-shards", type=int, default=1, help="How many server shards split the parameters.")
@env_option("--data-shards", type=int, default=1, help="Data shards to hand out to workers (usually the worker count).")
@env_option("--wait-for-workers", type=click.IntRange(min=0), default=0,
            help="ssp and sync: answer no push until this many workers have said hello, so that the first "
                 "to join does not run ahead or run rounds alone (psgd train gives its worker count).")
@env_option("--shm/--no-shm", "shared_memory", default=True,
            help="Offer workers on this machine the shared-memory fast path.")
@env_option("--ready-file", type=click.Path(dir_okay=False), default=None,
            help="Write {endpoint, pid} as JSON here once listening.")
@env_option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
            help="Write checkpoints here (atomically), every --checkpoint-every seconds and on a clean stop.")
@env_option("--checkpoint-every", type=float, default=10.0, help="Seconds between checkpoints.")
@env_option("--checkpoint-every-updates", type=int, default=None, help="Also checkpoint after this many updates.")
@env_option("--resume/--no-resume", default=False, help="Start from the newest valid checkpoint.")
@env_option("--metrics", default=None, metavar="[HOST:]PORT", callback=_check_address,
            help="Serve this server's Prometheus /metrics (and its page) here; a bare PORT listens on 127.0.0.1.")
@env_option("--timing-trace", type=click.Path(file_okay=False), default=None,
            help="Folder: at the end, write when each push was applied, and whose, to FOLDER/server.npz "
                 "(psgd.simulate.calibrate lines it up with the workers' traces).")
@click.pass_context
@env_option("--curve-secret-key", type=click.Path(dir_okay=False, exists=True), default=None,
            help="CURVE: encrypt and authenticate with this secret key file (from psgd keygen).")
@env_option("--curve-allow", type=click.Path(file_okay=False, exists=True), default=None,
            help="CURVE: the folder of public keys (*.key) of the clients to accept, as workers; those in its "
                 "control/ subfolder may also steer the run (set_lr, pause, resume, shutdown, describe). All "
                 "others get nothing.")
def server(ctx, bind, insecure, server_shard, num_shards, data_shards, wait_for_workers, shared_memory, ready_file,
           checkpoint_dir, checkpoint_every, checkpoint_every_updates, resume, metrics, timing_trace, curve_secret_key,
           curve_allow, **kw):
    """Run a parameter server: hold the weights, apply every push the moment it arrives.

    --max-updates and --max-seconds stop it by itself. A coordinator that watches it still
    gets the final weights: the server then waits (up to 30 s) for its shutdown."""
    from .server.exposure import resolve_bind
    from .server.loop import Server, ServerOptions
    from .wire.transport import allowed_roles, server_keys
    from .wire.protocol import CONTROL
    kw.update(workers=0)
    config = build_config(ctx, **kw)
    keys = server_keys(curve_secret_key, curve_allow)
    bind, warning = resolve_bind(bind, keys is not None, insecure)
    if warning:
        click.echo(warning, err=True)
    srv = Server(config, ServerOptions(bind, data_shards, shared_memory, ready_file, config.max_updates,
                                       config.max_seconds, checkpoint_dir, checkpoint_every, resume,
                                       server_shard, num_shards, keys,
                                       checkpoint_every_updates, insecure, wait_for_workers, timing_trace))
    st = srv.state.store
    click.echo(f"psgd server listening on {srv.endpoint} ({config.model.sizes}; shard {st.shard} of "
               f"{st.num_server_shards}: parameters [{st.lo}, {st.hi}))")
    if keys is not None:
        roles = list(allowed_roles(curve_allow).values())
        n, n_control = len(roles), roles.count(CONTROL)
        click.echo(f"CURVE: accepting {n} client key{'s' if n != 1 else ''} from {curve_allow} "
                   f"({n_control} control, {n - n_control} worker); others get nothing")
    board = None
    if metrics is not None:
        from .coordinator.dashboard import RunBoard
        board = RunBoard(metrics, config.to_dict(), f"server shard {st.shard}", click.echo)
        srv.publish = board.feed_from_server
    try:
        stats = srv.run()
    finally:
        if board is not None:
            board.close()
    click.echo(f"server stopped at version {stats['version']}; errors {stats['errors'] or 'none'}")


@cli.command()
@env_option("--connect", default="tcp://127.0.0.1:5555",
            help="The server's ZeroMQ endpoint; for K server shards, all K, comma-separated, in shard order.")
@env_option("--name", default="", help="How the server's statistics name this worker.")
@env_option("--transport", type=click.Choice(TRANSPORTS), default="auto",
            help="auto: shared memory if the server is on this machine, else zmq.")
@env_option("--data-shard", "shard", type=int, default=None,
            help="Data shard to train on (default: the server assigns one).")
@env_option("--data-dir", type=click.Path(file_okay=False), default=None)
@env_option("--batch-size", type=int, default=None, help="Default: the run's, from the server.")
@env_option("--n-fetch", type=int, default=None, help="Default: the run's, from the server.")
@env_option("--n-push", type=int, default=None, help="Default: the run's, from the server.")
@env_option("--max-steps", type=int, default=None, help="Stop after this many minibatches.")
@env_option("--server-wait", type=float, default=None, help="Seconds to keep trying an absent server.")
@env_option("--slowdown", type=float, default=1.0, help="Take this many times the compute time per step.")
@env_option("--model", default=None, help="package.module:factory, when the run trains a user's model.")
@env_option("--overlap/--no-overlap", default=None, help="Default: the run's, from the server.")
@env_option("--count", type=click.IntRange(1, 4096), default=1,
            help="Start this many workers, one process each, reaped together (named NAME-0.. with --name).")
@env_option("--threads", type=click.IntRange(1), default=None,
            help="BLAS threads per worker. Default: this host's cores divided by the workers running on it.")
@env_option("--timing-trace", type=click.Path(file_okay=False), default=None,
            help="Folder: at the end, write each step's phase timings to FOLDER/NAME.npz (the first "
                 "100,000 laps; psgd.simulate.calibrate replays them).")
@client_curve_options
@click.pass_context
def worker(ctx, connect, name, transport, shard, data_dir, batch_size, n_fetch, n_push, max_steps, server_wait, slowdown,
           model, overlap, count, threads, timing_trace, curve_key, curve_server_key):
    """Run a worker: pull weights, compute gradients on a data shard, push them (Downpour)."""
    if count > 1:
        from .worker.group import run_group
        if shard is not None:
            raise PsgdError("--data-shard names one shard: give it to one worker, not to --count workers")
        ctx.exit(run_group(count, _given_args(ctx, exclude={"count", "name"}), name, _group_args(ctx)))
    from .wire.transport import SERVER_WAIT_S, client_keys
    from .worker.loop import Worker, WorkerOptions
    options = WorkerOptions(connect, name, transport, shard, data_dir, batch_size, n_fetch, n_push, max_steps,
                            server_wait if server_wait is not None else SERVER_WAIT_S, slowdown,
                            client_keys(curve_key, curve_server_key), model, overlap, threads, timing_trace)
    work = Worker(options)
    stats = work.run()
    if work.stop_signal is not None and not work.joined_once:
        click.echo(f"psgd: worker stopped by {signal.Signals(work.stop_signal).name} before it joined the server: "
                   "nothing trained", err=True)
        ctx.exit(128 + work.stop_signal)
    mean = stats["staleness_sum"] / stats["pushes"] if stats["pushes"] else 0.0
    click.echo(f"worker done: {stats['steps']} steps, {stats['pushes']} pushes, {stats['examples']} examples, "
               f"mean staleness {mean:.2f}, compute {stats['compute_s']:.2f} s, communication {stats['comm_s']:.2f} s, "
               f"{stats['reconnects']} reconnects")
    if work.stop_signal is not None:  # stopped warm by a signal: 130 after a Ctrl-C, as psgd train
        ctx.exit(128 + work.stop_signal)


@cli.command()
@env_option("--connect", default="tcp://127.0.0.1:5555", help="The server's ZeroMQ endpoint (K shards: all K, comma-separated, in order).")
@env_option("--data-dir", type=click.Path(file_okay=False), default=None, help="Where this machine keeps the data.")
@env_option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/latest", help="Run directory.")
@env_option("--epochs", type=float, default=None, help="Default: the run's, from the server.")
@env_option("--evals-per-epoch", type=int, default=None, help="Default: the run's, from the server.")
@env_option("--target-accuracy", type=float, default=None, help="Stop once validation accuracy reaches this.")
@env_option("--max-updates", type=int, default=None, help="Stop after this many applied updates.")
@env_option("--max-seconds", type=float, default=None, help="Stop after this many seconds.")
@env_option("--model", default=None, help="package.module:factory, when the run trains a user's model.")
@dashboard_options
@client_curve_options
def coordinator(connect, curve_key, curve_server_key, model, dashboard, dashboard_hold, **overrides):
    """Watch and steer a running cluster: evaluate, set the learning rate, stop it, write the run.

    For K server shards, --connect lists all K endpoints, comma-separated, in shard order."""
    from .coordinator.loop import Coordinator
    from .data.prepared import prepare_data
    from .wire.client import ParameterClient
    from .wire.transport import client_keys
    keys = client_keys(curve_key, curve_server_key)
    client = ParameterClient(connect, "coordinator", keys)
    try:
        description = client.describe()
    finally:
        client.close()
    config = TrainConfig.from_description(description)
    config = config.with_(**{k: v for k, v in overrides.items() if v is not None})
    described = description.get("model") or {}
    if described.get("user"):  # the server names no module: this process brings its own
        if not model:
            raise PsgdError("the run trains a user's model: start the coordinator with --model package.module:factory")
        m = config.model
        config = config.with_(model=ModelSpec(m.sizes, m.hidden, m.loss, m.dtype, factory=model))
    from .model.interface import build_model, check_welcome
    net = build_model(config.model)
    check_welcome(net, config.model, described, net.layout.to_wire(), "coordinator")  # the fingerprint must match
    from .launch import WarmThenCold
    interrupt = WarmThenCold()
    data = prepare_data(config)
    from .coordinator.dashboard import RunBoard
    board = RunBoard(dashboard, data.config.to_dict(), Path(config.out_dir).name if config.out_dir else "live",
                     lambda text: click.echo(text, err=True))
    try:
        coord = Coordinator(data.config, connect, data, Progress(), keys=keys, stop_requested=interrupt.requested,
                            live=board.live)
        try:
            summary = coord.finish(coord.run())
        except KeyboardInterrupt:  # a second Ctrl-C: leave the servers be
            raise
        except BaseException:
            coord.end_run()
            raise
        coord.end_run()
        board.hold(dashboard_hold, interrupt.requested)
    finally:
        board.close()
    print_summary(summary)
    say_where_the_run_went(config.out_dir, summary)


@cli.command()
@env_option("--connect", default="tcp://127.0.0.1:5555", help="The server's endpoint (K shards: all K, comma-separated).")
@env_option("--json/--text", "as_json", default=False, help="Print the statistics as JSON.")
@click.option("--shutdown", is_flag=True,
              help="Then tell the server(s) to end the run; a coordinator watching it evaluates the final "
                   "weights and writes the run (with CURVE: needs a control key).")
@client_curve_options
def status(connect, as_json, shutdown, curve_key, curve_server_key):
    """Show a running server's statistics: version, examples, staleness, workers."""
    from .metrics import StalenessHistogram
    from .wire.client import ParameterClient
    from .wire.transport import client_keys
    group = ParameterClient(connect, "status", client_keys(curve_key, curve_server_key))
    try:
        stats = group.stats(workers=True)
        if shutdown:
            group.control({"type": "shutdown", "finish": True})
    finally:
        group.close()
    if as_json:
        click.echo(json.dumps(stats))
        return
    hist = StalenessHistogram.from_dict(stats["staleness"]).summary()
    click.echo(f"version {stats['version']}, {stats['examples']} examples, lr {stats['lr']:.4g}, "
               f"staleness mean {hist['mean']:.2f} max {hist['max']}, errors {stats['errors'] or 'none'}")
    guard = stats.get("outlier_guard") or {}
    if guard.get("on"):
        median = guard.get("median_norm")
        click.echo(f"outlier guard: refuses a gradient norm above {guard['k']:g} x the median "
                   + (f"{median:.4g}" if median is not None else "(none yet)")
                   + f" of the last {guard['window']} accepted pushes"
                   + ("" if guard.get("judging") else f" (warming up: judges after {guard['warmup']})"))
    else:
        click.echo("outlier guard: off")
    for w in stats["workers"].values():
        state = "live" if w["connected"] else ("lease ran out" if w["expired"] else "gone")
        outliers = w.get("outliers", 0)
        click.echo(f"  {w['name']}: {state}, {w['transport']}, data shards {w['data_shards']}, {w['pushes']} pushes, "
                   f"{w['examples_per_s']:.0f} examples/s"
                   + (f", {outliers} pushes refused as outliers" if outliers else "")
                   + (" FLAGGED" if w.get("flagged") else ""))
    if shutdown:
        click.echo("told the server to end the run")


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--name", "names", multiple=True, default=["server"], show_default=True,
              help="Key pairs to write (repeatable): FOLDER/NAME.key (public) and FOLDER/NAME.key_secret.")
@click.option("--cluster", is_flag=True,
              help="Instead, a whole cluster's keys, keeping any already there: server.key(_secret), "
                   "worker.key_secret, control.key_secret, and the server's allowed folder allowed/ (worker.key; "
                   "control/control.key).")
def keygen(folder, names, cluster):
    """Write CURVE key pairs for encrypted, authenticated traffic.

    Give the server its NAME.key_secret (--curve-secret-key) and a folder holding the public
    .key files of the clients it accepts (--curve-allow): workers' keys in the folder itself,
    control keys (coordinator, psgd status --shutdown) in its control/ subfolder. Give each
    worker and coordinator its own .key_secret (--curve-key) and the server's .key
    (--curve-server-key). --cluster lays all of that out in FOLDER."""
    from .wire.transport import write_cluster_keys, write_keypair
    if cluster:
        k = write_cluster_keys(folder)
        click.echo(f"CURVE keys in {folder}:\n"
                   f"  server:      --curve-secret-key {k['server_secret']} --curve-allow {k['allowed']}\n"
                   f"  workers:     --curve-key {k['worker_secret']} --curve-server-key {k['server_public']}\n"
                   f"  coordinator: --curve-key {k['control_secret']} --curve-server-key {k['server_public']}")
        return
    for name in names:
        public, secret = write_keypair(folder, name)
        click.echo(f"{public} (public) and {secret} (secret, mode 600)")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write PNG plots (needs matplotlib).")
@click.option("--plots-dir", type=click.Path(file_okay=False), default=None,
              help="Where PNGs go. Default: RUN/plots for one run, ./comparison.png for several.")
@click.option("--serve", is_flag=True, help="Show the runs side by side on the dashboard page, until Ctrl-C.")
@env_option("--address", default=DASHBOARD_DEFAULT, metavar="[HOST:]PORT", callback=_check_address,
            help="--serve: where (a bare PORT listens on 127.0.0.1; port 0: any free one).")
def report(runs, plots, plots_dir, serve, address):
    """Summarise runs: a text report for each and, for several, a side-by-side table; PNG plots."""
    from .coordinator import report as rep
    loaded = [rep.Run(Path(r)) for r in runs]
    if serve:
        serve_runs(loaded, address)
        return
    for run in loaded:
        for line in rep.text_report(run):
            click.echo(line)
        click.echo("")
    if len(loaded) > 1:
        for line in rep.comparison(loaded):
            click.echo(line)
    if not plots:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        click.echo("plots need matplotlib: pip install 'psgd[plot]' (the text above is the whole report without it)")
        return
    if len(loaded) == 1:
        written = rep.plot_run(loaded[0], Path(plots_dir) if plots_dir else loaded[0].path / "plots")
    else:
        written = [rep.plot_comparison(loaded, Path(plots_dir or ".") / "comparison.png")]
    click.echo("plots: " + ", ".join(str(p) for p in written))


def serve_runs(loaded, address: str) -> None:
    """``psgd report --serve``: finished runs on the dashboard page, until a signal."""
    import signal
    import time
    from .coordinator.dashboard import Dashboard, parse_address
    from .coordinator.live import snapshot_of_run_dir
    snapshots = []
    for run in loaded:
        try:
            snapshots.append(snapshot_of_run_dir(run.path))
        except (OSError, ValueError, KeyError) as exc:
            raise PsgdError(f"{run.path}: cannot show this run ({type(exc).__name__}: {exc})") from None
    board = Dashboard(lambda: snapshots, parse_address(address))
    click.echo(f"psgd: {len(snapshots)} run(s) at {board.url} (Ctrl-C to stop)", err=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        board.close()


class LossyStream:
    """stdout or stderr whose writes may fail (a log file on a full disk) without ending the
    process: a server must not die of a log line. What cannot be written is dropped."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError:
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError:
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main():
    import faulthandler
    import signal
    sys.stdout, sys.stderr = LossyStream(sys.stdout), LossyStream(sys.stderr)
    if hasattr(signal, "SIGUSR1"):  # kill -USR1 PID prints every thread's stack: where is it stuck?
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        cli(prog_name="psgd")
    except SystemExit:
        if _exit_at_once:
            exit_interrupted()
        raise


def exit_interrupted() -> None:
    """Exit with status 130 now, the streams flushed (see _exit_at_once for why not sys.exit)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(INTERRUPTED_STATUS)


if __name__ == "__main__":
    main()
