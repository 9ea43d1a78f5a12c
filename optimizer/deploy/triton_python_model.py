"""The model ``dlopt serve`` puts in Triton's Python backend: the artefact, opened with ``dlopt.load``.

Copied into the serving repository as ``NAME/1/model.py``; Triton's Python-backend stub imports it.
Its configuration comes from ``config.pbtxt``'s parameters: ``dlopt_output`` (the output folder or
bundle candidate to load) and ``threads`` (0: the artefact's own setting).  Tensors cross the stub
by DLPack: the stub's NumPy interface was built against NumPy 1, and NumPy 2 arrays passed through
it arrive with the wrong contents, where DLPack hands over the buffer itself.

With dynamic batching, the requests of one ``execute`` call run as one batch (concatenated along
the first axis, the outputs split back); a request whose other dimensions differ from the first's
runs on its own.  An error answers the requests it concerns, never the whole server.

Importable without Triton (``triton_python_backend_utils`` is imported when Triton loads the model),
so that dlopt's own import checks see it.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def _quiet_dlpack_capsules(hook=sys.unraisablehook) -> None:
    """The stub renames a DLPack capsule it consumed to "used_dlpack" where NumPy's destructor expects
    "used_dltensor", so NumPy reports a harmless ValueError per output tensor: leave those out."""

    def quiet(unraisable) -> None:
        if isinstance(unraisable.exc_value, ValueError) and "PyCapsule_GetPointer" in str(unraisable.exc_value):
            return
        hook(unraisable)

    sys.unraisablehook = quiet


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import dlopt

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        threads = int(params.get("threads") or 0) or None
        self.runner = dlopt.load(params["dlopt_output"], threads=threads)
        self.inputs = [i["name"] for i in config.get("input", [])]
        self.outputs = [o["name"] for o in config.get("output", [])]
        self.batched = int(config.get("max_batch_size") or 0) > 0
        self._metrics(args["model_name"])
        _quiet_dlpack_capsules()

    def _metrics(self, name: str) -> None:
        """dlopt's metrics beside Triton's own on /metrics: which artefact this is, and for an INT8 one the
        values per input outside the ranges it was calibrated on (dlopt.deploy.drift)."""
        import triton_python_backend_utils as pb_utils

        from dlopt.deploy.drift import input_ranges

        runner = self.runner
        info = pb_utils.MetricFamily(name="dlopt_model_info", kind=pb_utils.MetricFamily.GAUGE,
                                     description="The artefact dlopt serves: its candidate key and precision (1)")
        self._info = (info, info.Metric(labels={"model": name, "key": runner.key, "precision": runner.precision,
                                                "ran_as": str(runner.ran_as)}))
        self._info[1].set(1)
        self.ranges = input_ranges(runner.folder)
        self._outside = {}
        if self.ranges:
            family = pb_utils.MetricFamily(
                name="dlopt_input_out_of_range", kind=pb_utils.MetricFamily.COUNTER,
                description="Input values outside the range the INT8 artefact was calibrated on (clipped), per input")
            self._outside = {n: family.Metric(labels={"model": name, "input": n}) for n in self.ranges}
            self._outside_family = family

    def _count_outside(self, feed: dict) -> None:
        from dlopt.deploy.drift import outside

        for name, (low, high) in self.ranges.items():
            if name in feed:
                count = outside(feed[name], low, high)
                if count:
                    self._outside[name].increment(count)

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        feeds = []
        for request in requests:
            feeds.append({name: np.array(np.from_dlpack(pb_utils.get_input_tensor_by_name(request, name)))
                          for name in self.inputs})
        for feed in feeds:
            self._count_outside(feed)
        results: list = [None] * len(requests)
        for group in self._groups(feeds):
            try:
                outputs = self._run([feeds[i] for i in group])
            except Exception as exc:  # the requests of this group fail; the server goes on
                for i in group:
                    results[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))
                continue
            for i, outs in zip(group, outputs):
                tensors = [pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(out))
                           for name, out in zip(self.outputs, outs)]
                results[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return results

    def _groups(self, feeds: list[dict]) -> list[list[int]]:
        """Requests that can run as one batch: the same trailing dimensions for every input."""
        if not self.batched:
            return [[i] for i in range(len(feeds))]
        groups: dict[tuple, list[int]] = {}
        for i, feed in enumerate(feeds):
            key = tuple((name, feed[name].shape[1:], feed[name].dtype.str) for name in self.inputs)
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _run(self, feeds: list[dict]) -> list[list[np.ndarray]]:
        """Each feed's outputs; several feeds run as one batch and are split back by their batch sizes."""
        if len(feeds) == 1:
            return [self.runner.run(feeds[0])]
        sizes = [len(next(iter(feed.values()))) for feed in feeds]
        batch = {name: np.concatenate([feed[name] for feed in feeds]) for name in self.inputs}
        outputs = self.runner.run(batch)
        bounds = np.cumsum([0, *sizes])
        return [[out[bounds[k]:bounds[k + 1]] for out in outputs] for k in range(len(feeds))]

    def finalize(self) -> None:
        self.runner.close()
