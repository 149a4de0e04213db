from django.contrib import admin, messages

from . import services
from .models import Dataset


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ["name", "owner", "kind", "file_format", "num_examples", "size_bytes", "created_at"]
    list_filter = ["kind", "file_format", "owner"]
    search_fields = ["name", "original_filename"]
    list_select_related = ["owner"]
    date_hierarchy = "created_at"
    readonly_fields = [
        "file", "original_filename", "file_format", "kind", "num_examples", "size_bytes", "sha256", "stats_cache",
        "created_at",
    ]

    def has_add_permission(self, request) -> bool:
        return False  # uploads are validated by the dataset page and the API

    # Deleting here removes the file too, like the dataset page does; a dataset a queued or running job uses stays.
    def delete_model(self, request, obj: Dataset) -> None:
        self.delete_queryset(request, [obj])

    def delete_queryset(self, request, queryset) -> None:
        for dataset in queryset:
            try:
                services.delete_dataset(dataset)
            except services.DatasetInUse as exc:
                self.message_user(request, f"{exc}.", messages.ERROR)
