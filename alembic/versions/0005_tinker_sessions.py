"""tinker_session, tinker_model, tinker_future: the Tinker download flow's objects get their own
tables; their rows move out of idempotency_record (keys ``tinker-session:``, ``tinker-model:``,
``tinker-future:``), which keeps only real idempotency keys (copy_weights)

Revision ID: 0005_tinker_sessions
Revises: 0004_usage_day
Create Date: 2026-12-02 12:00:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0005_tinker_sessions'
down_revision: str | None = '0004_usage_day'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, idempotency_record.operation, key prefix) of each object that used to live there
SESSION = ('tinker_session', 'tinker_session', 'tinker-session:')
MODEL = ('tinker_model', 'tinker_model', 'tinker-model:')
FUTURE = ('tinker_future', 'tinker_future', 'tinker-future:')

idempotency_record = sa.table(
    'idempotency_record',
    sa.column('tenant_id', sa.String()),
    sa.column('key', sa.String()),
    sa.column('operation', sa.String()),
    sa.column('created_at', sa.DateTime(timezone=True)),
    sa.column('response', sa.JSON()),
)


def _tenant_id() -> sa.Column:
    return sa.Column('tenant_id', sa.String(length=64), sa.ForeignKey('tenant.id'), nullable=False)


def _created_at() -> sa.Column:
    return sa.Column('created_at', sa.DateTime(timezone=True), nullable=False)


def _create_tables() -> None:
    op.create_table(SESSION[0],
    _tenant_id(),
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    _created_at(),
    sa.Column('finish_reason', sa.String(length=255), nullable=True),
    sa.Column('project_id', sa.String(length=255), nullable=True),
    sa.Column('tags', sa.JSON(), nullable=True),
    sa.Column('user_metadata', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('tenant_id', 'id')
    )
    op.create_table(MODEL[0],
    _tenant_id(),
    sa.Column('id', sa.String(length=200), nullable=False),
    sa.Column('session_id', sa.String(length=64), nullable=False),
    sa.Column('source_checkpoint_id', sa.String(length=64), nullable=False),
    sa.Column('source_path', sa.String(length=512), nullable=False),
    _created_at(),
    sa.PrimaryKeyConstraint('tenant_id', 'id')
    )
    op.create_table(FUTURE[0],
    _tenant_id(),
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    _created_at(),
    sa.Column('job_id', sa.String(length=64), nullable=True),
    sa.Column('model_id', sa.String(length=200), nullable=True),
    sa.Column('output_name', sa.String(length=255), nullable=True),
    sa.Column('ttl_seconds', sa.Integer(), nullable=True),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('tenant_id', 'id')
    )


# --- data steps (lightweight tables: only the columns they touch) -------------------------------

tinker_session = sa.table(
    'tinker_session',
    *[sa.column(name, sa.String()) for name in ('tenant_id', 'id', 'state', 'finish_reason', 'project_id')],
    sa.column('created_at', sa.DateTime(timezone=True)),
    sa.column('tags', sa.JSON()),
    sa.column('user_metadata', sa.JSON()),
)
tinker_model = sa.table(
    'tinker_model',
    *[sa.column(name, sa.String()) for name in ('tenant_id', 'id', 'session_id', 'source_checkpoint_id', 'source_path')],
    sa.column('created_at', sa.DateTime(timezone=True)),
)
tinker_future = sa.table(
    'tinker_future',
    *[sa.column(name, sa.String()) for name in ('tenant_id', 'id', 'state', 'job_id', 'model_id', 'output_name')],
    sa.column('created_at', sa.DateTime(timezone=True)),
    sa.column('ttl_seconds', sa.Integer()),
    sa.column('result', sa.JSON()),
)
TABLES = {SESSION: tinker_session, MODEL: tinker_model, FUTURE: tinker_future}


def _constant(value: str) -> sa.ColumnElement[str]:
    # inlined, not a bound parameter: PostgreSQL cannot type a bare parameter in a SELECT list
    return sa.literal_column("'" + value.replace("'", "''") + "'", sa.String())


def _rows_of(spec: tuple[str, str, str]) -> sa.ColumnElement[bool]:
    _table, operation, prefix = spec
    return sa.and_(idempotency_record.c.operation == operation, idempotency_record.c.key.startswith(prefix))


def _text(field: str) -> sa.ColumnElement[str]:
    return idempotency_record.c.response[field].as_string()


def _move_in(spec: tuple[str, str, str], fields: dict[str, sa.ColumnElement], state: str | None = None) -> None:
    """INSERT ... SELECT the records of one kind into their table, the response's fields as columns."""
    columns = {
        'tenant_id': idempotency_record.c.tenant_id,
        'id': sa.func.substr(idempotency_record.c.key, len(spec[2]) + 1),
        'created_at': idempotency_record.c.created_at,
        **fields,
    }
    select = sa.select(*[expr.label(name) for name, expr in columns.items()]).where(_rows_of(spec))
    if state is not None:
        select = select.where(_text('state') == state)
    op.execute(sa.insert(TABLES[spec]).from_select(list(columns), select))


def _move_all_in() -> None:
    response = idempotency_record.c.response
    _move_in(SESSION, {
        'state': _text('state'),
        'finish_reason': _text('reason'),
        'project_id': _text('project_id'),
        'tags': response['tags'],
        'user_metadata': response['user_metadata'],
    })
    _move_in(MODEL, {name: _text(name) for name in ('session_id', 'source_checkpoint_id', 'source_path')})
    _move_in(FUTURE, {'state': _text('state'), 'result': response['result']}, state='done')
    _move_in(FUTURE, {
        'state': _text('state'),
        'job_id': _text('job_id'),
        'model_id': _text('model_id'),
        'output_name': _text('name'),
        'ttl_seconds': response['ttl_seconds'].as_integer(),
    }, state='export')
    op.execute(sa.delete(idempotency_record).where(sa.or_(*[_rows_of(spec) for spec in TABLES])))


def _json_object(fields: dict[str, sa.ColumnElement]) -> sa.ColumnElement:
    """A JSON object built in SQL; JSON-valued columns stay JSON, not quoted text."""
    if op.get_bind().dialect.name == 'postgresql':
        return sa.func.json_build_object(*[x for name, expr in fields.items() for x in (_constant(name), expr)])
    return sa.func.json_object(*[
        x
        for name, expr in fields.items()
        for x in (_constant(name), sa.func.json(expr) if isinstance(expr.type, sa.JSON) else expr)
    ])


def _move_out(spec: tuple[str, str, str], fields: dict[str, str], state: str | None = None) -> None:
    """INSERT ... SELECT one table's rows back as records; ``fields`` maps response keys to columns."""
    table = TABLES[spec]
    select = sa.select(
        table.c.tenant_id,
        (_constant(spec[2]) + table.c.id).label('key'),
        _constant(spec[1]).label('operation'),
        table.c.created_at,
        _json_object({key: table.c[column] for key, column in fields.items()}).label('response'),
    )
    if state is not None:
        select = select.where(table.c.state == state)
    op.execute(sa.insert(idempotency_record).from_select(['tenant_id', 'key', 'operation', 'created_at', 'response'], select))


def _move_all_out() -> None:
    session_fields = {name: name for name in ('state', 'user_metadata', 'tags', 'project_id')}
    _move_out(SESSION, session_fields, state='active')
    _move_out(SESSION, {**session_fields, 'reason': 'finish_reason'}, state='finished')
    _move_out(MODEL, {name: name for name in ('source_checkpoint_id', 'source_path', 'session_id')})
    _move_out(FUTURE, {'state': 'state', 'result': 'result'}, state='done')
    export_fields = ('state', 'job_id', 'model_id', 'ttl_seconds')
    _move_out(FUTURE, {**{name: name for name in export_fields}, 'name': 'output_name'}, state='export')


def upgrade() -> None:
    _create_tables()
    _move_all_in()


def downgrade() -> None:
    _move_all_out()
    for table, _operation, _prefix in (FUTURE, MODEL, SESSION):
        op.drop_table(table)
