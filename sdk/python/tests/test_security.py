"""TLS, mutual TLS and client tokens, as the Rust SDK's tests do them:
certificates made for the test (openssl), never committed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import padlock


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(['openssl', *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path):
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    if shutil.which('openssl') is None:
        pytest.fail('openssl is missing: install it (apt-get install openssl)')
    ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes']
    openssl('req', '-x509', *ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2',
            '-subj', '/CN=padlock test CA', cwd=tmp_path)
    for who, ext in [
        ('server', 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth'),
        ('client', 'extendedKeyUsage=clientAuth'),
    ]:
        (tmp_path / f'{who}.ext').write_text(ext + '\n')
        openssl('req', *ec, '-keyout', f'{who}.key', '-out', f'{who}.csr',
                '-subj', f'/CN=padlock test {who}', cwd=tmp_path)
        openssl('x509', '-req', '-in', f'{who}.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key',
                '-CAcreateserial', '-out', f'{who}.pem', '-days', '2',
                '-extfile', f'{who}.ext', cwd=tmp_path)
    return tmp_path


def test_tls_and_a_client_token(start_server, pki):
    tokens = pki / 'tokens'
    tokens.write_text('tok-team team/\n')
    server = start_server(
        '--tls-cert', str(pki / 'server.pem'),
        '--tls-key', str(pki / 'server.key'),
        '--client-token-file', str(tokens),
    )
    url = f'https://{server.addr}'
    client = padlock.Client(url, ca_cert=pki / 'ca.pem', token='tok-team')
    with client.lock('team/x', timeout=5) as lock:
        assert lock.fence > 0
    # The token's prefix is enforced.
    with pytest.raises(padlock.LockException) as denied:
        client.lock('other/x', timeout=5).acquire()
    assert denied.value.code.name == 'PERMISSION_DENIED'
    # No token, or a wrong one: refused.
    for token in (None, 'nope'):
        anonymous = padlock.Client(url, ca_cert=(pki / 'ca.pem').read_bytes(), token=token)
        with pytest.raises(padlock.LockException) as refused:
            anonymous.lock('team/x', timeout=5).acquire()
        assert refused.value.code.name == 'UNAUTHENTICATED'
    # Plain text against TLS fails.
    with pytest.raises(padlock.LockException):
        padlock.Client(f'http://{server.addr}', token='tok-team').lock('team/x', timeout=2).acquire()


def test_mutual_tls(start_server, pki):
    server = start_server(
        '--tls-cert', str(pki / 'server.pem'),
        '--tls-key', str(pki / 'server.key'),
        '--tls-client-ca', str(pki / 'ca.pem'),
    )
    url = f'https://{server.addr}'
    client = padlock.Client(
        url,
        ca_cert=pki / 'ca.pem',
        client_cert=pki / 'client.pem',
        client_key=pki / 'client.key',
    )
    with client.lock('mtls', timeout=5) as lock:
        assert lock.fence > 0
    without = padlock.Client(url, ca_cert=pki / 'ca.pem')
    with pytest.raises(padlock.LockException):
        without.lock('mtls', timeout=2).acquire()


def test_tls_settings_need_an_https_url():
    with pytest.raises(ValueError, match='https://'):
        padlock.Client('http://127.0.0.1:1', ca_cert=b'pem')
