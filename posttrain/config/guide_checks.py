"""Checks of the `guide` section (Guide, adaptive guidance): each raises one `ConfigError` line
naming the field and what would be valid. Called by `checks.validate`."""

from __future__ import annotations

import difflib
import math

from posttrain.config.schema import Config
from posttrain.errors import ConfigError
from posttrain.errors import require as _check
from posttrain.guidance import HINT_FUNCTIONS, TEMPLATE_FIELDS, template_fields

# the algorithm whose loss trains hinted samples against their hinted-context logp_old
GUIDE_ALGORITHMS = ("grpo",)


def _check_hint_fn(name: str) -> None:
    names = list(HINT_FUNCTIONS)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.4)
    hint = f"; did you mean {close[0]!r}?" if close else f"; use one of {', '.join(names)}"
    _check(name in HINT_FUNCTIONS, f"guide.hint_fn: {name!r} is not a built-in hint function{hint}")


def _check_template(template: str) -> None:
    try:
        fields = template_fields(template)
    except ValueError as err:
        raise ConfigError(
            f"guide.hint_template={template!r} is not a valid template ({err}); use {{prompt}} "
            "and {hint}, and {{ }} for literal braces"
        ) from None
    unknown = [f for f in fields if f not in TEMPLATE_FIELDS]
    _check(
        not unknown,
        f"guide.hint_template: unknown placeholder {{{unknown[0] if unknown else ''}}}; the "
        "template takes {prompt} and {hint} (write {{ }} for literal braces)",
    )
    _check(
        "hint" in fields,
        f"guide.hint_template={template!r} has no {{hint}} placeholder (e.g. "
        "'{prompt}\\nHint: {hint}'); the hint would never reach the prompt",
    )


def validate_guide(cfg: Config) -> None:
    """`guide.*`: the hint source, template, replacement count and threshold (checked even with
    guide off, so a typo shows at once); with guide on, an algorithm that can train it."""
    g, G = cfg.guide, cfg.rollout.samples_per_prompt
    if g.hint_fn is not None:
        _check_hint_fn(g.hint_fn)
    _check_template(g.hint_template)
    _check(
        g.replace is None or 1 <= g.replace <= G,
        f"guide.replace={g.replace} must be in 1..rollout.samples_per_prompt={G} (hinted samples "
        "per all-fail group), or null (all of them)",
    )
    _check(
        math.isfinite(g.success_threshold),
        f"guide.success_threshold={g.success_threshold} must be a finite number (e.g. 1.0)",
    )
    _check(
        0.0 <= g.warmup_hinted <= 1.0,
        f"guide.warmup_hinted={g.warmup_hinted} must be in [0, 1] (the share of SFT warm-up rows "
        "shown with their hint)",
    )
    _check(
        g.warmup_hinted == 0 or g.hint_fn is not None or bool(g.hint_column.strip()),
        f"guide.warmup_hinted={g.warmup_hinted} needs hints: guide.hint_column is empty; name "
        f"the data column holding each row's hint, or set guide.hint_fn (one of "
        f"{', '.join(HINT_FUNCTIONS)})",
    )
    if not g.enabled:
        return
    _check(
        g.hint_fn is not None or bool(g.hint_column.strip()),
        "guide.hint_column is empty: name the data column holding each row's hint, or set "
        f"guide.hint_fn (one of {', '.join(HINT_FUNCTIONS)})",
    )
    algo = cfg.train.algorithm
    _check(
        algo in GUIDE_ALGORITHMS,
        f"guide.enabled needs train.algorithm=grpo (the GRPO family), not {algo!r}; set "
        "guide.enabled=false",
    )
    _check(
        cfg.env.name is None,
        f"guide.enabled hints single-turn prompts; it cannot be used with env.name="
        f"{cfg.env.name!r} (multi-turn episodes): set guide.enabled=false",
    )
    _check(
        cfg.advantage.estimator != "opo",
        "guide.enabled trains hinted samples off-policy, but advantage.estimator=opo is exactly "
        "on-policy: use another estimator (e.g. grpo) or set guide.enabled=false",
    )
