from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('training', '0006_job_move_from'),
    ]

    operations = [
        migrations.AddField(
            model_name='job',
            name='merged_status',
            field=models.CharField(choices=[('none', 'not built'), ('building', 'building'), ('ready', 'ready'), ('failed', 'failed')], default='none', editable=False, max_length=10),
        ),
        migrations.AddField(
            model_name='job',
            name='merged_bytes',
            field=models.PositiveBigIntegerField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name='job',
            name='merged_error',
            field=models.TextField(blank=True, editable=False),
        ),
        migrations.AddField(
            model_name='job',
            name='merged_requested_at',
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name='job',
            name='merged_started_at',
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
    ]
