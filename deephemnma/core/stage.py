"""What a pipeline stage declares once, in its command module (``STAGE = Stage(...)``).

The workflow (``workflow/rules/common.smk``: per-stage settings files and result folders), the
report (its sections) and the CLI (``deephemnma --help`` lists the stages in pipeline order)
all read these declarations; nothing else keeps a list of stages. Adding a stage is one
package module, one command module (with its ``STAGE``), one rule file and one schema section.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    """A stage of the pipeline.

    ``order``     its position in the pipeline (the CLI lists stages by it);
    ``sections``  the configuration it reads: a section (``"align"``) or one key of a
                  section (``"landscape.filter"``). The workflow writes exactly these, with
                  the seed, into ``<outdir>/config/<name>.yaml``, so that changing them
                  reruns this stage (and what depends on it) and nothing else;
    ``results``   its folder under the results directory (None: it writes none);
    ``report``    the title of its section in the report (None: not shown);
    ``derived``   settings the workflow sets from another key, e.g.
                  ``{"network.engine": "workflow.train_engine"}``.
    """

    order: int
    sections: tuple[str, ...] = ()
    results: str | None = None
    report: str | None = None
    derived: dict = field(default_factory=dict)

    def select_config(self, config: dict) -> dict:
        """The part of ``config`` this stage reads (with the seed), derived keys applied."""
        doc: dict = {"seed": config["seed"]}
        for spec in self.sections:
            section, _, key = spec.partition(".")
            if key:
                doc.setdefault(section, {})[key] = config[section][key]
            else:
                doc[section] = config[section]
        for target, source in self.derived.items():
            t_sec, t_key = target.split(".", 1)
            s_sec, s_key = source.split(".", 1)
            doc.setdefault(t_sec, dict(config[t_sec]))[t_key] = config[s_sec][s_key]
        return doc
