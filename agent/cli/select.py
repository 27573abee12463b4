"""The command line's traffic selection and rewriting: flags, their checked values
(:class:`SelectOptions`) and the hooks they make.

Every flag is a config key and a ``MIRROR_AGENT_*`` variable like any other
(:mod:`agent.cli.layers`). The regex flags take a whole value each from the config file and
the environment (a comma belongs to the regex): several go as a TOML list. Selection
(``--allow-*``, ``--deny-*``, ``--sample-by-header``, ``--rate-limit``) applies to the forward
and the record path alike unless ``--select-for`` says one; rewriting applies to forwarded
requests only (the recording keeps what production saw).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.hooks import Hook
from agent.hooks.rewrite import RewriteRequests, check_host, parse_rewrite_path
from agent.hooks.select import (
    Selection,
    SelectRequests,
    parse_header_rule,
    parse_methods,
    parse_rate,
    parse_regex,
    parse_sample,
)

__all__ = ["SelectOptions", "add_selection_options", "select_options"]

SELECT_FOR = ("both", "forward", "record")


class AppendWhole(argparse.Action):
    """A repeatable flag (each use appends its value) whose config-file or environment value
    is one item, never split at commas (:mod:`agent.cli.layers` reads ``whole_values``)."""

    whole_values = True

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        items.append(values)
        setattr(namespace, self.dest, items)


def _text_of(parse: Callable[[str], object], normal: Callable[[str], str] = str.strip,
             ) -> Callable[[str], str]:
    """An argparse type: ``text`` checked by ``parse``, kept as text (``normal``ised) so it
    shows as written in ``mirror-agent config`` and ``/status``."""
    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return normal(text)
    return check


def _methods(text: str) -> str:
    return ",".join(parse_methods(text))


def add_selection_options(p: argparse.ArgumentParser) -> None:
    """The selection and rewrite flags of ``offline``, ``run`` and ``serve``."""
    method, regex = _text_of(parse_methods, _methods), _text_of(parse_regex, str)
    for verb, what in (("allow", "keep only requests"), ("deny", "drop requests")):
        p.add_argument(f"--{verb}-method", action="append", type=method, metavar="METHOD[,...]",
                       help=f"{what} with one of these HTTP/1.x methods; repeatable")
        p.add_argument(f"--{verb}-path", action=AppendWhole, type=regex, metavar="REGEX",
                       help=f"{what} whose request-target (path?query as sent) this regex "
                            "finds (re.search: anchor with ^ and $); repeatable")
        p.add_argument(f"--{verb}-header", action=AppendWhole, metavar="'NAME: REGEX'",
                       type=_text_of(parse_header_rule),
                       help=f"{what} with a header NAME whose value REGEX finds (an empty "
                            "REGEX: with the header at all); repeatable")
    p.add_argument("--sample-by-header", type=_text_of(parse_sample), metavar="NAME:PCT%",
                   help="keep PCT%% of the values of header NAME, consistently (a keyed "
                        "hash: the same user is always in or out, on every agent); requests "
                        "without it are dropped")
    p.add_argument("--rate-limit", type=_text_of(parse_rate), metavar="N/s",
                   help="at most N requests a second over all connections (token bucket, "
                        "burst N, on capture time); the rest are dropped and counted")
    p.add_argument("--select-for", choices=SELECT_FOR, default="both",
                   help="where the --allow-*/--deny-*/--sample-by-header/--rate-limit "
                        "selection applies: both paths (default), forward or record only")
    p.add_argument("--rewrite-path", action=AppendWhole, type=_text_of(parse_rewrite_path, str),
                   metavar="REGEX=REPLACEMENT",
                   help="rewrite forwarded request-targets (re.sub; \\1 for groups; \\= for "
                        "an = in REGEX); repeatable, applied in order; needs --target")
    p.add_argument("--rewrite-host", type=_text_of(check_host), metavar="HOST[:PORT]",
                   help="set the Host of forwarded requests; needs --target")


@dataclass(frozen=True, slots=True)
class SelectOptions:
    """The selection and rewrite flags, as checked text (see :func:`add_selection_options`)."""

    allow_method: tuple[str, ...] = ()
    deny_method: tuple[str, ...] = ()
    allow_path: tuple[str, ...] = ()
    deny_path: tuple[str, ...] = ()
    allow_header: tuple[str, ...] = ()
    deny_header: tuple[str, ...] = ()
    sample_by_header: str | None = None
    rate_limit: str | None = None
    select_for: str = "both"
    rewrite_path: tuple[str, ...] = ()
    rewrite_host: str | None = None

    def selection(self) -> Selection:
        """The :class:`~agent.hooks.select.Selection` the flags describe."""
        def methods(texts: Sequence[str]) -> frozenset[str]:
            return frozenset(m for t in texts for m in parse_methods(t))
        return Selection(
            allow_methods=methods(self.allow_method), deny_methods=methods(self.deny_method),
            allow_paths=tuple(map(parse_regex, self.allow_path)),
            deny_paths=tuple(map(parse_regex, self.deny_path)),
            allow_headers=tuple(map(parse_header_rule, self.allow_header)),
            deny_headers=tuple(map(parse_header_rule, self.deny_header)),
            sample=parse_sample(self.sample_by_header) if self.sample_by_header else None,
            rate=parse_rate(self.rate_limit) if self.rate_limit else None)

    @property
    def rewrites(self) -> bool:
        return bool(self.rewrite_path) or self.rewrite_host is not None

    def select_hooks(self) -> tuple[list[Hook], list[Hook]]:
        """(forward, record) selection hooks: one each where ``select_for`` applies (each
        with its own framing and rate limit), none without selection flags."""
        selection = self.selection()
        if not selection:
            return [], []
        forward: list[Hook] = [SelectRequests(selection, "forward")]
        record: list[Hook] = [SelectRequests(selection, "record")]
        return (forward if self.select_for != "record" else [],
                record if self.select_for != "forward" else [])

    def rewrite_hooks(self) -> list[Hook]:
        """The forward path's rewrite hook, if a rewrite flag is given."""
        if not self.rewrites:
            return []
        return [RewriteRequests([parse_rewrite_path(t) for t in self.rewrite_path],
                                self.rewrite_host)]


def select_options(v: Mapping[str, Any]) -> SelectOptions:
    """The :class:`SelectOptions` among the merged option values ``v`` (by dest)."""
    def texts(dest: str) -> tuple[str, ...]:
        return tuple(v.get(dest) or ())
    return SelectOptions(
        allow_method=texts("allow_method"), deny_method=texts("deny_method"),
        allow_path=texts("allow_path"), deny_path=texts("deny_path"),
        allow_header=texts("allow_header"), deny_header=texts("deny_header"),
        sample_by_header=v.get("sample_by_header"), rate_limit=v.get("rate_limit"),
        select_for=v.get("select_for") or "both", rewrite_path=texts("rewrite_path"),
        rewrite_host=v.get("rewrite_host"))
