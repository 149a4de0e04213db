from django.contrib import admin, messages

from . import services
from .models import Job, JobLink, MetricPoint


class JobLinkInline(admin.TabularInline):
    """The trunks the job runs on, link by link (recorded by the worker, read only)."""

    model = JobLink
    fields = ["position", "trunk", "trunk_name", "first_block", "last_block"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "owner", "dataset_name", "base_model", "trunk", "status", "progress", "last_loss",
                    "created_at"]
    list_filter = ["status", "base_model", "trunk", "owner"]
    search_fields = ["name", "dataset_name", "owner__username", "error_message"]
    readonly_fields = ["status", "phase", "chat_format", "error_message", "cancel_requested", "attempts", "worker",
                       "current_step", "total_steps", "train_examples", "val_examples", "last_loss", "last_val_loss", "created_at",
                       "started_at", "finished_at", "updated_at", "heartbeat_at"]
    actions = ["cancel", "resume"]
    inlines = [JobLinkInline]

    @admin.display(description="progress")
    def progress(self, job: Job) -> str:
        return f"{job.current_step}/{job.total_steps or '?'}"

    def _apply(self, request, queryset, action, verb: str) -> None:
        done, refused = 0, []
        for job in queryset:
            try:
                action(job)
                done += 1
            except services.JobStateError as exc:
                refused.append(str(exc))
        if done:
            self.message_user(request, f"{verb} {done} job(s).", messages.SUCCESS)
        for message in refused:
            self.message_user(request, message, messages.WARNING)

    @admin.action(description="Cancel the selected jobs")
    def cancel(self, request, queryset) -> None:
        self._apply(request, queryset, services.cancel_job, "Cancelled")

    @admin.action(description="Resume the selected jobs")
    def resume(self, request, queryset) -> None:
        self._apply(request, queryset, services.resume_job, "Resumed")


@admin.register(MetricPoint)
class MetricPointAdmin(admin.ModelAdmin):
    list_display = ["job", "step", "kind", "loss", "val_loss", "lr", "grad_norm"]
    list_filter = ["kind"]
    search_fields = ["job__id"]
