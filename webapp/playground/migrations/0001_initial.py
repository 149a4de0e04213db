import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        ("training", "0001_initial"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="Generation",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("base_model", models.CharField(max_length=200)),
                ("prompt", models.TextField()),
                ("chat", models.BooleanField(default=True,
                                             help_text="the prompt went through the tokenizer's chat template")),
                ("max_new_tokens", models.PositiveIntegerField(default=64)),
                ("temperature", models.FloatField(default=0.0)),
                ("seed", models.PositiveIntegerField(default=0)),
                ("status", models.CharField(choices=[("queued", "queued"), ("running", "running"),
                                                     ("succeeded", "succeeded"), ("failed", "failed")],
                                            db_index=True, default="queued", max_length=10)),
                ("output", models.TextField(blank=True)),
                ("token_count", models.PositiveIntegerField(default=0)),
                ("error_message", models.TextField(blank=True)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("started_at", models.DateTimeField(blank=True, null=True)),
                ("finished_at", models.DateTimeField(blank=True, null=True)),
                ("job", models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE,
                                          related_name="generations", to="training.job")),
                ("owner", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE,
                                            related_name="generations", to=settings.AUTH_USER_MODEL)),
            ],
            options={
                "ordering": ["-created_at", "-id"],
            },
        ),
    ]
