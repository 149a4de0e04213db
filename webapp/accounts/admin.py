"""The users' admin: what each user stores, and deletion that takes their files with their rows."""

from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.http import HttpResponseRedirect
from django.urls import reverse

from ..storage import usage
from .deletion import UserBusy, delete_user

User = get_user_model()


class StudioUserAdmin(UserAdmin):
    list_display = (*UserAdmin.list_display, "storage")

    @admin.display(description="storage (of quota)")
    def storage(self, user) -> str:
        return usage(user).words()

    def delete_model(self, request, obj) -> None:
        self.delete_queryset(request, [obj])

    def response_delete(self, request, obj_display, obj_id):
        if User.objects.filter(pk=obj_id).exists():  # refused (a job still runs): no "deleted successfully"
            return HttpResponseRedirect(reverse("admin:auth_user_changelist"))
        return super().response_delete(request, obj_display, obj_id)

    def delete_queryset(self, request, queryset) -> None:
        for user in queryset:
            try:
                self.message_user(request, delete_user(user).capitalize() + ".")
            except UserBusy as exc:
                self.message_user(request, f"{exc}.", messages.ERROR)


admin.site.unregister(User)
admin.site.register(User, StudioUserAdmin)
