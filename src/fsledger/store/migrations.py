"""Versioned schema migrations, one list per dialect. Applied at start-up, idempotently.

Append a new version to both lists to change the schema; never edit a released one.
"""

from __future__ import annotations

# The seed's tables, plus what exactness needs: the path as bytes, mtime_ns, ctime_ns,
# inode and hash_algo next to content_hash; repositories as rows; the change feed.
SQLITE: list[str] = [
    """
    CREATE TABLE repositories (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        root_path BLOB NOT NULL UNIQUE,
        settings TEXT NOT NULL DEFAULT '{}',
        root_dev INTEGER,
        state TEXT NOT NULL DEFAULT 'online',
        created_at TEXT NOT NULL
    );
    CREATE TABLE file_records (
        id INTEGER PRIMARY KEY,
        repository_id TEXT NOT NULL,
        file_path BLOB NOT NULL,
        file_size INTEGER NOT NULL,
        mod_time TEXT NOT NULL,
        mtime_ns INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL,
        content_hash TEXT,
        hash_algo TEXT,
        last_scanned TEXT NOT NULL,
        scan_generation INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        CONSTRAINT file_records_unique UNIQUE (repository_id, file_path)
    );
    CREATE INDEX idx_file_records_repo ON file_records(repository_id);
    CREATE INDEX idx_file_records_hash ON file_records(content_hash);
    CREATE INDEX idx_file_records_scanned ON file_records(last_scanned);
    CREATE INDEX idx_file_records_inode ON file_records(repository_id, inode);
    CREATE TABLE sync_operations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        repository_id TEXT NOT NULL,
        operation_type TEXT NOT NULL,
        files_scanned INTEGER NOT NULL DEFAULT 0,
        files_added INTEGER NOT NULL DEFAULT 0,
        files_updated INTEGER NOT NULL DEFAULT 0,
        files_removed INTEGER NOT NULL DEFAULT 0,
        start_time TEXT NOT NULL,
        end_time TEXT,
        duration_ms INTEGER,
        status TEXT NOT NULL,
        error_message TEXT,
        stats TEXT,
        owner TEXT,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
    );
    CREATE INDEX idx_sync_ops_repo ON sync_operations(repository_id);
    CREATE INDEX idx_sync_ops_time ON sync_operations(start_time DESC);
    CREATE TABLE change_log (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        repository_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        file_path BLOB NOT NULL,
        old_path BLOB,
        file_size INTEGER,
        content_hash TEXT,
        hash_algo TEXT,
        recorded_at TEXT NOT NULL
    );
    CREATE INDEX idx_change_log_repo ON change_log(repository_id, seq);
    """,
    # 2: what the HTTP service needs of the feed. feed_state holds the database's random feed
    # id (a cursor names it) and the retention low-water mark; feed_consumers holds durable
    # cursors of readers inside fsledger (webhooks), so they resume after a restart.
    """
    CREATE TABLE feed_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        feed_id TEXT NOT NULL,
        pruned_through INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO feed_state (id, feed_id) VALUES (1, lower(hex(randomblob(8))));
    CREATE TABLE feed_consumers (
        name TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX idx_change_log_time ON change_log(recorded_at);
    CREATE INDEX idx_file_records_dup ON file_records(content_hash, file_size);
    """,
    # 3: filesystems mounted below a root, as the last scan saw them (fsledger.mounts): one
    # that is not mounted any more keeps its records instead of looking emptied.
    """
    CREATE TABLE mount_points (
        repository_id TEXT NOT NULL,
        mount_path BLOB NOT NULL,
        fs_type TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL DEFAULT '',
        mounted INTEGER NOT NULL DEFAULT 1,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (repository_id, mount_path)
    );
    """,
    # 4: distributed scanning (scan_jobs, scan_work) is PostgreSQL only: SQLite is one host's
    # store. The version is kept so that both lists stay numbered alike.
    "",
    # 5: indexes no query needs, which every insert and update paid for: file_records'
    # repository index is the left prefix of UNIQUE (repository_id, file_path), the hash
    # index the left prefix of idx_file_records_dup, and no query filters or sorts by
    # last_scanned. A first index of 100k files wrote six B-trees per row; now three.
    """
    DROP INDEX IF EXISTS idx_file_records_repo;
    DROP INDEX IF EXISTS idx_file_records_hash;
    DROP INDEX IF EXISTS idx_file_records_scanned;
    """,
    # 6: PostgreSQL's content_hash collation (TEXT compares bytewise here already).
    "",
    # 7: cursors that notice a restored database (fsledger.feed). Each entry keeps the random
    # tag of the transaction that appended it, and a cursor carries the tag of its entry: a
    # seq that a restore handed out again now has another tag. feed_state keeps the tag of
    # the retention mark (its entry may be pruned), feed_consumers the tag of a webhook's
    # cursor. Entries written before this migration have tag 0.
    """
    ALTER TABLE change_log ADD COLUMN tag INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE feed_state ADD COLUMN pruned_tag INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE feed_consumers ADD COLUMN tag INTEGER NOT NULL DEFAULT 0;
    """,
    # 8: the running manager's schedule (fsledger.schedule): a consumer's quiet request and
    # each repository's next run, wait and interval, as JSON, so that `fsledger quiet` reaches
    # the manager and `fsledger status` shows what it decided, from other processes.
    """
    CREATE TABLE schedule_state (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    """,
    # 10 (numbered on merge): repositories mirrored to buckets (fsledger.s3.mirror): where
    # (URL and endpoint, never a secret), the feed cursor the mirror has made durable in the
    # bucket, the entries a dead run may have been acting on (inflight_seq), its state (active
    # or paused, and why), the deletions accepted by `mirror resume --accept-deletes`, and
    # cumulative counters for `mirror status` and /metrics.
    """
    CREATE TABLE mirrors (
        id TEXT PRIMARY KEY,
        repository_id TEXT NOT NULL,
        url TEXT NOT NULL,
        endpoint_url TEXT NOT NULL DEFAULT '',
        max_delete INTEGER,
        state TEXT NOT NULL DEFAULT 'active',
        reason TEXT,
        cursor_seq INTEGER,
        cursor_tag INTEGER NOT NULL DEFAULT 0,
        inflight_seq INTEGER NOT NULL DEFAULT 0,
        accept_deletes_through INTEGER NOT NULL DEFAULT 0,
        uploaded INTEGER NOT NULL DEFAULT 0,
        uploaded_bytes INTEGER NOT NULL DEFAULT 0,
        skipped INTEGER NOT NULL DEFAULT 0,
        copied INTEGER NOT NULL DEFAULT 0,
        deleted INTEGER NOT NULL DEFAULT 0,
        deferred INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        last_error_at TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        CONSTRAINT mirrors_unique UNIQUE (url, endpoint_url)
    );
    """,
]

POSTGRES: list[str] = [
    """
    CREATE TABLE repositories (
        id UUID PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        root_path BYTEA NOT NULL UNIQUE,
        settings TEXT NOT NULL DEFAULT '{}',
        root_dev BIGINT,
        state TEXT NOT NULL DEFAULT 'online',
        created_at TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE file_records (
        id BIGSERIAL PRIMARY KEY,
        repository_id UUID NOT NULL,
        file_path BYTEA NOT NULL,
        file_size BIGINT NOT NULL,
        mod_time TIMESTAMPTZ NOT NULL,
        mtime_ns BIGINT NOT NULL,
        ctime_ns BIGINT NOT NULL,
        inode BIGINT NOT NULL,
        content_hash TEXT,
        hash_algo TEXT,
        last_scanned TIMESTAMPTZ NOT NULL,
        scan_generation INTEGER NOT NULL DEFAULT 0,
        created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
        updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
        CONSTRAINT file_records_unique UNIQUE (repository_id, file_path)
    );
    CREATE INDEX idx_file_records_repo ON file_records(repository_id);
    CREATE INDEX idx_file_records_hash ON file_records(content_hash);
    CREATE INDEX idx_file_records_scanned ON file_records(last_scanned);
    CREATE INDEX idx_file_records_inode ON file_records(repository_id, inode);
    CREATE TABLE sync_operations (
        id BIGSERIAL PRIMARY KEY,
        repository_id UUID NOT NULL,
        operation_type TEXT NOT NULL,
        files_scanned INTEGER NOT NULL DEFAULT 0,
        files_added INTEGER NOT NULL DEFAULT 0,
        files_updated INTEGER NOT NULL DEFAULT 0,
        files_removed INTEGER NOT NULL DEFAULT 0,
        start_time TIMESTAMPTZ NOT NULL,
        end_time TIMESTAMPTZ,
        duration_ms BIGINT,
        status TEXT NOT NULL,
        error_message TEXT,
        stats TEXT,
        owner TEXT,
        created_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
    );
    CREATE INDEX idx_sync_ops_repo ON sync_operations(repository_id);
    CREATE INDEX idx_sync_ops_time ON sync_operations(start_time DESC);
    CREATE TABLE change_log (
        seq BIGSERIAL PRIMARY KEY,
        repository_id UUID NOT NULL,
        kind TEXT NOT NULL,
        file_path BYTEA NOT NULL,
        old_path BYTEA,
        file_size BIGINT,
        content_hash TEXT,
        hash_algo TEXT,
        recorded_at TIMESTAMPTZ NOT NULL
    );
    CREATE INDEX idx_change_log_repo ON change_log(repository_id, seq);
    """,
    """
    CREATE TABLE feed_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        feed_id TEXT NOT NULL,
        pruned_through BIGINT NOT NULL DEFAULT 0
    );
    INSERT INTO feed_state (id, feed_id)
        VALUES (1, substr(md5(random()::text || clock_timestamp()::text), 1, 16));
    CREATE TABLE feed_consumers (
        name TEXT PRIMARY KEY,
        seq BIGINT NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL
    );
    CREATE INDEX idx_change_log_time ON change_log(recorded_at);
    CREATE INDEX idx_file_records_dup ON file_records(content_hash, file_size);
    """,
    """
    CREATE TABLE mount_points (
        repository_id UUID NOT NULL,
        mount_path BYTEA NOT NULL,
        fs_type TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL DEFAULT '',
        mounted BOOLEAN NOT NULL DEFAULT TRUE,
        updated_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (repository_id, mount_path)
    );
    """,
    # 4: distributed scanning (fsledger.distscan). The owner of a repository cuts its
    # reconciliation into key ranges, one scan_work row each; any agent with the root mounted
    # claims a pending row with FOR UPDATE SKIP LOCKED and holds the row lock while it computes,
    # so a claim dies with its agent. The owner holds a session advisory lock on the job's key
    # (lock_hi, lock_lo) for as long as the job lives: helpers skip jobs whose owner is gone.
    """
    CREATE TABLE scan_jobs (
        job_id UUID PRIMARY KEY,
        repository_id UUID NOT NULL,
        owner TEXT NOT NULL,
        params BYTEA NOT NULL,
        state TEXT NOT NULL DEFAULT 'open',
        lock_hi BIGINT NOT NULL,
        lock_lo BIGINT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
    );
    CREATE TABLE scan_work (
        job_id UUID NOT NULL REFERENCES scan_jobs(job_id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        repository_id UUID NOT NULL,
        lo BYTEA NOT NULL,
        hi BYTEA,
        state TEXT NOT NULL DEFAULT 'pending',
        claimed_by TEXT,
        result BYTEA,
        finished_at TIMESTAMPTZ,
        PRIMARY KEY (job_id, seq)
    );
    CREATE INDEX idx_scan_work_pending ON scan_work(job_id, seq) WHERE state = 'pending';
    """,
    # 5: see SQLITE's 5.
    """
    DROP INDEX IF EXISTS idx_file_records_repo;
    DROP INDEX IF EXISTS idx_file_records_hash;
    DROP INDEX IF EXISTS idx_file_records_scanned;
    """,
    # 6: hashes are hex: compare them bytewise (COLLATE "C"), not through the database's
    # locale (strcoll in every step of idx_file_records_dup: a first index's inserts into
    # file_records took 16% longer with C.UTF-8, more with a language's collation).
    # Rebuilds that index; the table itself is not rewritten.
    """
    ALTER TABLE file_records ALTER COLUMN content_hash TYPE TEXT COLLATE "C";
    """,
    # 7: see SQLITE's 7.
    """
    ALTER TABLE change_log ADD COLUMN tag BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE feed_state ADD COLUMN pruned_tag BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE feed_consumers ADD COLUMN tag BIGINT NOT NULL DEFAULT 0;
    """,
    # 8: see SQLITE's 8.
    """
    CREATE TABLE schedule_state (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL
    );
    """,
    # 10: see SQLITE's 10.
    """
    CREATE TABLE mirrors (
        id UUID PRIMARY KEY,
        repository_id UUID NOT NULL,
        url TEXT NOT NULL,
        endpoint_url TEXT NOT NULL DEFAULT '',
        max_delete BIGINT,
        state TEXT NOT NULL DEFAULT 'active',
        reason TEXT,
        cursor_seq BIGINT,
        cursor_tag BIGINT NOT NULL DEFAULT 0,
        inflight_seq BIGINT NOT NULL DEFAULT 0,
        accept_deletes_through BIGINT NOT NULL DEFAULT 0,
        uploaded BIGINT NOT NULL DEFAULT 0,
        uploaded_bytes BIGINT NOT NULL DEFAULT 0,
        skipped BIGINT NOT NULL DEFAULT 0,
        copied BIGINT NOT NULL DEFAULT 0,
        deleted BIGINT NOT NULL DEFAULT 0,
        deferred BIGINT NOT NULL DEFAULT 0,
        errors BIGINT NOT NULL DEFAULT 0,
        last_error TEXT,
        last_error_at TIMESTAMPTZ,
        created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        CONSTRAINT mirrors_unique UNIQUE (url, endpoint_url)
    );
    """,
]
