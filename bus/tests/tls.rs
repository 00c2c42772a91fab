//! TLS between a client and a real nats-server, with a CA, a server certificate and a client
//! certificate generated at test time by `openssl` (nothing secret is checked in): a client that
//! trusts the CA and presents its certificate gets in; one without the CA, without a client
//! certificate, or without TLS at all does not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Result};
use usbpt_bus::auth::{CredsDir, Role};
use usbpt_bus::server::{NatsServer, ServerConfig, ServerTls};
use usbpt_bus::{Bus, ClientSecurity, StreamSettings, TlsClient};

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA, a certificate for 127.0.0.1 signed by it, and a client certificate signed by it.
fn pki(dir: &Path) -> Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "1",
                "-subj",
                "/CN=usbpt test CA",
            ],
        ]
        .concat(),
    )?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )?;
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
    for who in ["server", "client"] {
        let (key, csr, pem, ext) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.pem"),
            format!("{who}.ext"),
        );
        openssl(
            dir,
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    &key,
                    "-out",
                    &csr,
                    "-subj",
                    &format!("/CN=usbpt {who}"),
                ],
            ]
            .concat(),
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "1",
                "-extfile",
                &ext,
            ],
        )?;
    }
    Ok(())
}

fn tls(dir: &Path, ca: bool, client: bool) -> TlsClient {
    TlsClient {
        ca: ca.then(|| dir.join("ca.pem")),
        cert: client.then(|| dir.join("client.pem")),
        key: client.then(|| dir.join("client.key")),
    }
}

#[tokio::test]
async fn only_clients_with_the_ca_and_a_client_certificate_get_in() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d: PathBuf = dir.path().to_owned();
    pki(&d)?;
    let creds = CredsDir::open(d.join("creds"))?;
    creds.ensure(&Role::Admin)?;
    let mut config = ServerConfig::new(d.join("nats"));
    config.auth = Some(creds.write_auth_conf()?);
    config.tls = Some(ServerTls {
        cert: d.join("server.pem"),
        key: d.join("server.key"),
        ca: Some(d.join("ca.pem")),
    });
    let server = NatsServer::start(config).await?;
    let admin = creds.path(&Role::Admin);
    let settings = StreamSettings::default();
    let connect = |t: TlsClient| {
        let (url, admin, settings) = (server.url(), admin.clone(), settings.clone());
        async move {
            Bus::connect_checked(
                &url,
                Some(&admin),
                &settings,
                &ClientSecurity {
                    insecure: false,
                    tls: t,
                },
            )
            .await
        }
    };

    let bus = connect(tls(&d, true, true)).await?;
    assert!(bus.server_info().tls_required);
    assert_eq!(bus.last_sequence().await?, 0);

    assert!(
        connect(TlsClient::default()).await.is_err(),
        "plain TCP (or the system's roots) got in"
    );
    assert!(
        connect(tls(&d, true, false)).await.is_err(),
        "no client certificate got in"
    );
    assert!(
        connect(tls(&d, false, true)).await.is_err(),
        "a client that does not trust the CA got in"
    );
    Ok(())
}
