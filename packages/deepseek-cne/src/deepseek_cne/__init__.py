"""deepseek-cne: the Cloud-Native Edition.

Knative manifests with scale-to-zero and gVisor sandboxing (`deepseek_cne.knative`), GPU-kind scheduling
(`deepseek_cne.gpu`), the serving image's Dockerfile (`deepseek_cne.dockerfile`) and the Kubeflow
train -> compress -> evaluate -> deploy pipeline (`deepseek_cne.pipeline`). Checkpoints on s3:// and gs://
go through `deepseek_core.storage`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
