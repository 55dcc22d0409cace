"""The guide's inference_model.json: written for a registered model, and read back to run it the same way."""

from __future__ import annotations

import dataclasses
from typing import Any

from slmops.errors import NoImplementation
from slmops.plugin.roles import TemplateFamily, ToolSyntax
from slmops.templates.detection import ChosenTemplate


def inference_model(name: str, description: str, version: str, chosen: ChosenTemplate) -> dict[str, Any]:
    """The guide's inference_model.json, plus what slmops needs to run it the same way."""
    return {
        "Name": name,
        "Description": description,
        "Version": version,
        "PromptTemplate": chosen.family.prompt_template(),
        "ModelConfig": dict(chosen.family.model_config),
        "slmops": {
            "family": chosen.family.name,
            "how": chosen.how,
            "default_system": chosen.default_system,
            "bos": chosen.family.bos,
            "stop": chosen.family.stop,
            "markers": list(chosen.family.markers),
            "system_in_first_user": chosen.family.system_in_first_user,
            "tools": dataclasses.asdict(chosen.family.tools),  # how the model calls tools, kept with the folder
        },
    }


def family_from_inference_model(data: dict[str, Any]) -> ChosenTemplate:
    """Rebuild the template a registered model was deployed with."""
    pt, extra = data["PromptTemplate"], data.get("slmops", {})
    fam = TemplateFamily(
        name=extra.get("family", "custom"),
        description="",
        system=pt.get("system", ""),
        user=pt["user"],
        assistant=pt.get("assistant", ""),
        prompt=pt["prompt"],
        stop=extra.get("stop", []),
        model_config=data.get("ModelConfig", {}),
        bos=extra.get("bos", ""),
        system_in_first_user=extra.get("system_in_first_user"),
        markers=tuple(extra.get("markers", ())),
        tools=tool_syntax(extra),
    )
    return ChosenTemplate(fam, extra.get("how", "registered"), extra.get("default_system"))


def tool_syntax(extra: dict[str, Any]) -> ToolSyntax:
    """The tool syntax a folder was deployed with; for a folder written before slmops kept it, its family's."""
    if isinstance(extra.get("tools"), dict):
        kinds = {f.name: type(f.default) for f in dataclasses.fields(ToolSyntax)}  # str fields, and in_list a bool
        return ToolSyntax(**{k: v for k, v in extra["tools"].items() if k in kinds and isinstance(v, kinds[k])})
    from slmops.templates.detection import family_by_name

    try:
        return family_by_name(extra.get("family", "")).tools
    except NoImplementation:  # a family no plugin provides any more: the default syntax
        return ToolSyntax()
