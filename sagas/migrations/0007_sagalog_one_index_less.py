from django.db import migrations, models


class Migration(migrations.Migration):
    """Drop SagaLog's index on ``saga`` alone: (saga, started_at) serves every lookup by saga.

    Only the index goes. Django's own AlterField would also drop and re-add
    the foreign key, which scans the whole table under a lock: at millions
    of log rows, seconds of blocked writes for nothing.
    """

    dependencies = [("sagas", "0006_compensation_deadline")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="sagalog",
                    name="saga",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=models.deletion.CASCADE,
                        related_name="logs",
                        to="sagas.saga",
                    ),
                ),
            ],
            database_operations=[
                migrations.RunSQL(
                    'DROP INDEX IF EXISTS "sagas_sagalog_saga_id_cef79dc3"',
                    reverse_sql=(
                        'CREATE INDEX "sagas_sagalog_saga_id_cef79dc3" '
                        'ON "sagas_sagalog" ("saga_id")'
                    ),
                ),
            ],
        ),
    ]
