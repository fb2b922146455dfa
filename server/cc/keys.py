"""Every Redis key of the command center, built in one place.

Accounts are hashes keyed by email (managers) or username (donors); a token
is never stored, only sha256(token) -> account. Targets are hashes plus
index sets (all, by owner, by stage) so listing and assignment never scan
everything. Stream bytes live on the workservers; the CC keeps only which
target and WS each stream belongs to, and per-target per-WS counts.
"""

WORKSERVERS = 'workservers'              # set of ws names


def ws(name):
    """hash: url, http_port, online ('1'/'0'), fails (consecutive)."""
    return 'ws:%s' % name


def ws_pending_deletes(name):
    """set of target ids deleted while this WS did not answer."""
    return 'ws:%s:pending_deletes' % name


# Accounts

def manager(email):
    """hash: email, role, weight, password (scrypt), token (sha256 hex)."""
    return 'manager:%s' % email


def manager_token(token_hash):
    """string: email of the manager holding the token."""
    return 'manager_token:%s' % token_hash


def donor(username):
    """hash: username, email, password (scrypt), token (sha256 hex)."""
    return 'donor:%s' % username


def donor_email(email):
    """string: username of the donor with this email (uniqueness)."""
    return 'donor_email:%s' % email


def donor_token(token_hash):
    """string: username of the donor holding the token."""
    return 'donor_token:%s' % token_hash


# Targets

TARGETS = 'targets'                      # set of every target id


def target(target_id):
    """hash: owner, description, creation_date, stage, engine, weight and
    JSON fields engine_versions, allowed_ws, options, files."""
    return 'target:%s' % target_id


def owner_targets(email):
    """set of the target ids a manager owns."""
    return 'manager:%s:targets' % email


def stage_targets(stage):
    """set of the target ids in a stage (private, beta, public)."""
    return 'targets:stage:%s' % stage


def target_ws(target_id):
    """hash: ws name -> number of the target's streams on it (placed or
    being placed)."""
    return 'target:%s:ws' % target_id


def target_ws_files(target_id):
    """set of the WS that already hold the target's files."""
    return 'target:%s:ws_files' % target_id


def target_streams(target_id):
    """set of the target's stream ids."""
    return 'target:%s:streams' % target_id


# Streams

def stream(stream_id):
    """hash: target_id, ws."""
    return 'stream:%s' % stream_id


# Templates for Lua scripts that walk from one key to others ('%s' is the
# target id or ws name), so that the names stay defined above.
MANAGER_TEMPLATE = manager('%s')
TARGET_TEMPLATE = target('%s')
TARGET_WS_TEMPLATE = target_ws('%s')
WS_TEMPLATE = ws('%s')
