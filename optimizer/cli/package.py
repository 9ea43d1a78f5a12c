"""``dlopt package``: hand a finished compile to Triton, KServe, MLflow or Prometheus.

Only click is imported with this module so ``dlopt --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from dlopt.deploy.options import publish_options


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@publish_options
def package(out, publishing):
    """Publish OUT (a `dlopt compile` output folder, or one of its bundle/<backend>-<precision>/
    candidates) to a Triton model repository, a KServe manifest, MLflow or Prometheus.

    \b
    Triton: REPO/NAME/config.pbtxt (tritonclient's ModelConfig) and REPO/NAME/VERSION/ with
    model.onnx (ORT), model.xml + model.bin (OpenVINO) or model.plan (a built TensorRT engine).
    The versions of one NAME share its config.pbtxt: a version on another backend, or with other
    inputs or outputs, is refused; give it its own --name.

    \b
    Examples:
      dlopt package build/resnet-cpu --triton models/ --kserve
      dlopt package build/resnet-v2 --triton models/ --name resnet --version 2
      dlopt package build/jetson/bundle/tensorrt-fp16 --triton models/ --name resnet_jetson
      dlopt package build/resnet-cpu --mlflow --register resnet --metrics-file /var/lib/node_exporter/dlopt.prom
    """
    from dlopt.core.errors import ConfigError
    from dlopt.report.gate import load_report
    from dlopt.deploy.options import deploy
    from dlopt.targets import read_artifact

    if not publishing:
        raise ConfigError("nothing to do: give --triton REPO, --mlflow, --metrics-file or --pushgateway")
    _, root = read_artifact(out)  # ConfigError for a folder dlopt did not write
    report = load_report(root / "report.json")
    for line in deploy(report, root, publishing, artifact_dir=out):
        click.echo(line)


if __name__ == "__main__":
    package()
