from django.contrib import admin

from .models import Generation


@admin.register(Generation)
class GenerationAdmin(admin.ModelAdmin):
    list_display = ["id", "owner", "base_model", "job", "status", "token_count", "created_at"]
    list_filter = ["status", "base_model", "owner"]
    search_fields = ["prompt", "owner__username", "error_message"]
    readonly_fields = ["owner", "job", "base_model", "prompt", "chat", "max_new_tokens", "temperature", "seed",
                       "status", "output", "token_count", "error_message", "stop_requested", "created_at",
                       "started_at", "finished_at"]
