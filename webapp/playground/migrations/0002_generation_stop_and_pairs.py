import django.db.models.deletion
from django.db import migrations, models


def pair_existing_comparisons(apps, schema_editor):
    """An adapter's generation was always created right after the base model's, with the same prompt."""
    Generation = apps.get_model("playground", "Generation")
    for adapted in Generation.objects.filter(job__isnull=False, paired_with__isnull=True).iterator():
        base = Generation.objects.filter(pk=adapted.pk - 1, owner_id=adapted.owner_id, job__isnull=True,
                                         prompt=adapted.prompt, base_model=adapted.base_model).first()
        if base is not None:
            Generation.objects.filter(pk=adapted.pk).update(paired_with=base)


class Migration(migrations.Migration):

    dependencies = [
        ("playground", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="generation",
            name="paired_with",
            field=models.ForeignKey(blank=True, editable=False, null=True,
                                    on_delete=django.db.models.deletion.CASCADE, related_name="paired",
                                    to="playground.generation"),
        ),
        migrations.AddField(
            model_name="generation",
            name="stop_requested",
            field=models.BooleanField(default=False),
        ),
        migrations.AlterField(
            model_name="generation",
            name="status",
            field=models.CharField(choices=[("queued", "queued"), ("running", "running"),
                                            ("succeeded", "succeeded"), ("failed", "failed"),
                                            ("stopped", "stopped")],
                                   db_index=True, default="queued", max_length=10),
        ),
        migrations.RunPython(pair_existing_comparisons, migrations.RunPython.noop),
    ]
