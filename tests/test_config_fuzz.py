"""Random values for the main config fields: every run starts, or fails with one ConfigError naming the field.

Hypothesis draws values for the fields a user sets most on the command line (seed, cohort size and
backend, algorithm, learning rate, epochs, batch size, partition and its alpha), valid and invalid
alike: negative, zero, huge, NaN/inf, floats where ints belong, words where numbers belong. Each
drawn config goes through the real ``train`` (a few batches, no plots, no test), which must return
its metrics or raise :class:`ConfigError` whose message names one of the drawn fields and shows the
value seen. Any other exception (an unexplained traceback) fails the test, and so does a run longer
than its deadline (what a hang would look like).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lightning_colearn.cli import ConfigError, train

pytestmark = pytest.mark.slow

WORDS = st.sampled_from(["abc", "none_of_these", "1e", "true"])
NUMBERS = st.one_of(
    st.integers(-3, 10),
    st.integers(10, 10**12),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)
FIELDS = {  # field: values to draw (the sensible ones are in there too)
    "seed": st.one_of(st.integers(-2, 2**31), st.floats(-1, 5), WORDS),
    "cohort.size": st.one_of(st.integers(-2, 40), st.floats(0, 6), WORDS),
    "cohort.backend": st.sampled_from(["loop", "stacked", "auto", "gpu"]),
    "optimizer.lr": st.one_of(NUMBERS, WORDS),
    "trainer.max_epochs": st.one_of(st.integers(-2, 2), WORDS),
    "data.batch_size": st.one_of(st.integers(-2, 5000), st.floats(0, 64), WORDS),
    "data.partition": st.sampled_from(["iid", "dirichlet", "shards", "random"]),
    "data.alpha": st.one_of(st.floats(-1, 10), st.just(math.nan), WORDS),
}
VALID = {  # sensible values, for the fields not under test in an example
    "seed": st.integers(0, 2**31),
    "cohort.size": st.integers(2, 12),
    "cohort.backend": st.sampled_from(["loop", "stacked", "auto"]),
    "optimizer.lr": st.floats(1e-4, 1.0),
    "trainer.max_epochs": st.just(1),
    "data.batch_size": st.integers(8, 128),
    "data.partition": st.sampled_from(["iid", "dirichlet", "shards"]),
    "data.alpha": st.floats(0.05, 10),
}
ALGORITHMS = st.sampled_from(["independent", "swarm", "mutual", "voting", "fedavg", "pofl"])


def _override(key: str, value) -> str:
    if isinstance(value, float):
        text = "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf else repr(value))
        return f"{key}={text}"
    return f"{key}={value}"


def _shown(value) -> list[str]:
    """Ways the message may show the value (as the user typed it, or as the config holds it)."""
    if isinstance(value, float) and math.isnan(value):
        return ["nan"]
    if isinstance(value, float) and math.isinf(value):
        return ["inf"]
    forms = [str(value), repr(value)]
    if isinstance(value, str):  # the override parser reads "true" as a bool, "1e3" as a float, ...
        parsed = yaml.safe_load(value)
        forms += [str(parsed), repr(parsed)]
    if isinstance(value, float) and value.is_integer():
        forms.append(str(int(value)))
    return forms


@settings(max_examples=30, deadline=60_000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(algorithm=ALGORITHMS, field=st.sampled_from(sorted(FIELDS)), data=st.data())
def test_any_config_starts_or_names_the_field(algorithm, field, data):
    """A random config either trains or raises one ConfigError naming a drawn field and its value."""
    # one field drawn from anything, some others from sensible values: every field gets its turn
    others = data.draw(st.fixed_dictionaries({}, optional={k: v for k, v in VALID.items() if k != field}), label="others")
    drawn = {**others, field: data.draw(FIELDS[field], label=field)}
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"algorithm={algorithm}", f"paths.output_dir={tmp}", "trainer=debug", "plots=false", "test=false",
            "data.eval_batch_size=100", "++trainer.limit_val_batches=1", "logger=none",
            *(_override(k, v) for k, v in drawn.items()),
        ]
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="lightning_colearn.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        try:
            train(cfg)
            event("trained")
        except ConfigError as err:
            message = str(err)
            event(f"ConfigError on {message.split(' ')[0].rstrip(':')}")
            assert "\n" not in message.strip(), message  # one line
            named = [k for k in drawn if k in message or k.split(".")[-1] in message]
            assert named or not drawn or _explained_without_drawn_field(message), (
                f"the error names none of the drawn fields {sorted(drawn)}: {message}"
            )
            if named and not _explained_without_drawn_field(message):
                key = named[0]
                assert any(form in message for form in _shown(drawn[key])), (
                    f"the error names {key} but not the value {drawn[key]!r}: {message}"
                )
        finally:
            GlobalHydra.instance().clear()
            assert not list(Path(tmp).glob("**/*.tmp")), "a half-written file was left behind"


def _explained_without_drawn_field(message: str) -> bool:
    """Errors about a combination (e.g. 40 members for 4,000 images) name the fields involved, not one value."""
    return message.startswith(("algorithm.callbacks.", "data:", "data.", "algorithm.module", "cohort.backend"))
