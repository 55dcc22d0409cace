"""The hooks a slmops plugin can implement.

Each ``register_*`` hook receives a ``register`` callback. Call it once per implementation the plugin
offers (a plugin may offer several); the core keeps the list, records which plugin registered each,
asks each implementation what it supports, and chooses. All answers are collected: none of these
hooks is ``firstresult``. Plugins are called in the order they were registered, built-in ones first;
a plugin whose hook raises is disabled for the run with one warning. A plugin imports
:mod:`slmops.api`, where the role base classes and helpers are.
"""

import pluggy

hookspec = pluggy.HookspecMarker("slmops")
hookimpl = pluggy.HookimplMarker("slmops")


@hookspec
def register_converters(register):
    """Register converters that turn a Hugging Face checkpoint into an ONNX Runtime GenAI model folder.

    :param register: call ``register(converter)`` with a :class:`slmops.api.Converter` for each
        backend. The core picks, among those whose ``check(request)`` returns ``None``, the one named
        by ``--backend``, else the one with the lowest ``cost``.
    """


@hookspec
def register_quantizers(register):
    """Register quantizers that rewrite the weights of an fp32 ONNX GenAI model at a lower precision.

    :param register: call ``register(quantizer)`` with a :class:`slmops.api.Quantizer`. A quantizer is
        used when no converter produces the requested precision directly (int8 with the pinned builder).
    """


@hookspec
def register_template_families(register):
    """Register prompt-template families (ChatML, Phi-3, Llama 3, ...).

    :param register: call ``register(family)`` with a :class:`slmops.api.TemplateFamily`. Detection
        asks every family to ``score`` a model folder; the highest positive score wins.
    """


@hookspec
def register_registries(register):
    """Register model registries: places where deployed models are recorded, listed, run and removed.

    :param register: call ``register(registry)`` with a :class:`slmops.api.Registry`. The one named in
        ``[registry] backend`` (or ``--registry``) is used.
    """


@hookspec
def register_benchmarkers(register):
    """Register benchmarkers that measure a deployed model (speed, memory, quality).

    :param register: call ``register(benchmarker)`` with a :class:`slmops.api.Benchmarker`. The first
        whose ``check(model_dir)`` returns ``None`` is used unless ``--benchmarker`` names one.
    """


@hookspec
def register_commands(cli):
    """Add commands to the ``slmops`` command line.

    :param cli: the root :class:`click.Group`; decorate functions with ``@cli.command()``.
    """
