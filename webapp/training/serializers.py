from rest_framework import serializers

from .compute import job_compute_share
from .events import chain_entries
from .models import Job, MetricPoint


class JobSerializer(serializers.ModelSerializer):
    dataset = serializers.PrimaryKeyRelatedField(read_only=True)
    trunk = serializers.SlugRelatedField(slug_field="name", read_only=True)
    links = serializers.SerializerMethodField()
    compute_share = serializers.SerializerMethodField()
    adapter_url = serializers.SerializerMethodField()
    merged_url = serializers.SerializerMethodField()

    class Meta:
        model = Job
        fields = ["id", "name", "dataset", "dataset_name", "base_model", "chat_format", "trunk", "links", "trunk_auto",
                  "adapter_method", "use_dora", "use_rslora", "lora_r", "lora_alpha", "lora_dropout",
                  "train_trunk_lora", "learning_rate", "epochs", "max_steps", "batch_size",
                  "grad_accum_steps", "max_seq_length", "warmup_steps", "lr_schedule", "seed", "val_fraction",
                  "wire_encoding", "bottom_layers", "top_layers", "hidden_noise", "grad_noise", "nopeek",
                  "private_bottom", "gradients_to_trunk", "compute_share",
                  "privacy_audit",
                  "status", "phase", "error_message", "cancel_requested", "current_step", "total_steps",
                  "train_examples", "val_examples", "last_loss", "last_val_loss", "created_at", "started_at",
                  "finished_at", "adapter_url", "merged_status", "merged_bytes", "merged_error", "merged_url"]
        read_only_fields = fields

    def get_links(self, job: Job) -> list[dict]:
        """The trunks the job runs (or ran) on, in block order: one for a single trunk, one per link of a chain."""
        return chain_entries(job)

    def get_compute_share(self, job: Job) -> dict | None:
        """The split of each step at the job's cut: client_blocks, trunk_blocks, total_blocks, client_share and a
        description (None: the model's config, or the trunk's default cut, is not known here)."""
        share = job_compute_share(job)
        return share.to_dict() if share is not None else None

    def get_adapter_url(self, job: Job) -> str | None:
        return f"/api/jobs/{job.pk}/adapter/" if job.has_adapter else None

    def get_merged_url(self, job: Job) -> str | None:
        return f"/api/jobs/{job.pk}/merged/" if job.has_merged else None


class MetricPointSerializer(serializers.ModelSerializer):
    class Meta:
        model = MetricPoint
        fields = ["step", "kind", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "wire_bytes", "elapsed_s"]
