"""Admin for trunk servers: status at a glance, 'Check now', and a token that is never shown back."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.utils.html import format_html
from django.utils.text import Truncator

from .health import HEALTH_FIELDS, check_trunks
from .models import BUDGET_FIELDS, TrunkServer

TOKEN_HELP_NEW = "The bearer token the trunk server was started with (its TRUNK_TOKEN). It is never shown again."
TOKEN_HELP_EDIT = ("The bearer token the trunk server was started with (its TRUNK_TOKEN). It is never shown: "
                   "leave this blank to keep the current token, or enter a new one to replace it.")
# Shown for a figure the trunk did not report (one from before it).
NOT_REPORTED = "not reported"
# Changing any of these makes the last check's result meaningless.
CONNECTION_FIELDS = ("address", "token", "use_tls", "tls_ca_certificate")

STATUS_COLORS = {
    TrunkServer.Status.UP: "#1a7f37",
    TrunkServer.Status.DOWN: "#cf222e",
    TrunkServer.Status.UNKNOWN: "#6e7781",
}


class TrunkServerForm(forms.ModelForm):
    token = forms.CharField(required=False, strip=True, widget=forms.PasswordInput(render_value=False),
                            help_text=TOKEN_HELP_NEW)

    class Meta:
        model = TrunkServer
        fields = ["name", "address", "token", "use_tls", "tls_ca_certificate", "enabled"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The stored token is not an initial value: it never reaches the page, and a blank
        # field on edit does not count as a change (nor appear as one in the history).
        self.initial["token"] = ""
        if self.instance.pk:
            self.fields["token"].help_text = TOKEN_HELP_EDIT

    def clean_token(self) -> str:
        token = self.cleaned_data.get("token", "")
        if token:
            return token
        if self.instance.pk:
            return TrunkServer.objects.values_list("token", flat=True).get(pk=self.instance.pk)
        raise forms.ValidationError("Enter the trunk server's token: every call except the health check needs it.")


@admin.register(TrunkServer)
class TrunkServerAdmin(admin.ModelAdmin):
    form = TrunkServerForm
    list_display = ("name", "address", "enabled", "status_badge", "latency", "model_id", "layers", "sessions",
                    "device_and_dtype", "memory", "last_checked_at", "short_error")
    list_filter = ("status", "enabled")
    search_fields = ("name", "address", "model_id")
    actions = ("check_now", "enable", "disable")
    readonly_fields = ("status_badge", "latency", "layers", "cuts", "sessions", "device_and_dtype", "memory") + tuple(
        field for field in HEALTH_FIELDS if field not in ("status", "latency_ms"))
    fieldsets = (
        (None, {"fields": ("name", "address", "token", "use_tls", "tls_ca_certificate", "enabled")}),
        ("Health", {
            "classes": ("collapse",),
            "description": "Filled by the health checks (every few seconds by Celery beat, or 'Check now').",
            "fields": ("status_badge", "latency", "last_checked_at", "last_error", "model_id", "model_type",
                       "weights_fingerprint", "layers", "num_layers", "trunk_start", "trunk_end", "cuts",
                       "min_trunk_start", "max_trunk_end", "hidden_size",
                       "sessions", "max_sessions", "active_sessions", "version", "device_and_dtype", "memory"),
        }),
        ("Per-session budgets", {
            "classes": ("collapse",),
            "description": "What one session may ask of the trunk; it refuses more. Empty: not reported "
                           "(a trunk from before these budgets).",
            "fields": BUDGET_FIELDS,
        }),
    )

    # ------------------------------------------------------------ columns

    @admin.display(description="cuts sessions may choose")
    def cuts(self, trunk: TrunkServer) -> str:
        return trunk.cut_bounds or "the default cut only"

    @admin.display(description="status", ordering="status")
    def status_badge(self, trunk: TrunkServer) -> str:
        return format_html(
            '<span style="display:inline-block;padding:1px 8px;border-radius:8px;color:#fff;'
            'background:{};font-weight:bold">{}</span>',
            STATUS_COLORS.get(trunk.status, STATUS_COLORS[TrunkServer.Status.UNKNOWN]), trunk.get_status_display(),
        )

    @admin.display(description="latency", ordering="latency_ms")
    def latency(self, trunk: TrunkServer) -> str:
        return "-" if trunk.latency_ms is None else f"{trunk.latency_ms:.1f} ms"

    @admin.display(description="layers")
    def layers(self, trunk: TrunkServer) -> str:
        return trunk.layer_range or "-"

    @admin.display(description="sessions (active/max)")
    def sessions(self, trunk: TrunkServer) -> str:
        if trunk.max_sessions is None:
            return "-"
        return f"{trunk.active_sessions if trunk.active_sessions is not None else '?'}/{trunk.max_sessions}"

    @admin.display(description="device")
    def device_and_dtype(self, trunk: TrunkServer) -> str:
        return trunk.device_summary or NOT_REPORTED

    @admin.display(description="memory")
    def memory(self, trunk: TrunkServer) -> str:
        return trunk.memory_summary or NOT_REPORTED

    @admin.display(description="last error")
    def short_error(self, trunk: TrunkServer) -> str:
        return Truncator(trunk.last_error).chars(80) if trunk.last_error else ""

    # ------------------------------------------------------------ saving

    def save_model(self, request, trunk: TrunkServer, form, change: bool) -> None:
        if change and any(field in form.changed_data for field in CONNECTION_FIELDS):
            # The last check was against the old settings: do not let jobs pick this trunk on its word.
            trunk.status = TrunkServer.Status.UNKNOWN
            trunk.latency_ms = None
            self.message_user(request, f"Trunk {trunk.name}: connection settings changed; its status is unknown until "
                                       f"the next check (select it and run 'Check now').", messages.INFO)
        super().save_model(request, trunk, form, change)

    # ------------------------------------------------------------ actions

    @admin.action(description="Check now")
    def check_now(self, request, queryset) -> None:
        for trunk in check_trunks(queryset):
            if trunk.status == TrunkServer.Status.UP:
                self.message_user(
                    request,
                    f"Trunk {trunk.name}: up, {trunk.latency_ms:.1f} ms, model {trunk.model_id}, layers "
                    f"{trunk.layer_range}, sessions {trunk.active_sessions}/{trunk.max_sessions}",
                    messages.SUCCESS,
                )
            else:
                self.message_user(request, f"Trunk {trunk.name}: down: {trunk.last_error}", messages.WARNING)

    @admin.action(description="Enable selected trunk servers")
    def enable(self, request, queryset) -> None:
        count = queryset.update(enabled=True)
        self.message_user(request, f"{count} trunk server(s) enabled.", messages.SUCCESS)

    @admin.action(description="Disable selected trunk servers (no new jobs; health checks stop)")
    def disable(self, request, queryset) -> None:
        count = queryset.update(enabled=False)
        self.message_user(request, f"{count} trunk server(s) disabled.", messages.SUCCESS)
