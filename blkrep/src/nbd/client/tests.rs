//! The client against a scripted server, for what our own server never does (lack FUA).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{ClientOptions, NbdClient};
use crate::nbd::codec::{self, Request};
use crate::nbd::proto::*;
use crate::transport::Endpoint;

/// Serve one client on `l` with an export of transmission `flags`: negotiation through
/// NBD_OPT_GO (every other option is unsupported), then a success reply to every request.
/// Returns the (command, flags) of each request before NBD_CMD_DISC.
async fn scripted_server(l: TcpListener, flags: u16) -> Vec<(u16, u16)> {
    let (mut s, _) = l.accept().await.unwrap();
    s.write_all(&codec::encode_greeting(
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    ))
    .await
    .unwrap();
    s.read_u32().await.unwrap();
    while !negotiate_option(&mut s, flags).await {}
    let mut seen = Vec::new();
    loop {
        let mut h = [0u8; codec::REQUEST_LEN];
        s.read_exact(&mut h).await.unwrap();
        let req = Request::decode(&h).unwrap();
        if req.command == CMD_DISC {
            return seen;
        }
        if req.command == CMD_WRITE {
            s.read_exact(&mut vec![0; req.length as usize])
                .await
                .unwrap();
        }
        seen.push((req.command, req.flags));
        let mut reply = Vec::new();
        codec::encode_simple_reply(&mut reply, 0, req.cookie);
        s.write_all(&reply).await.unwrap();
    }
}

/// Answer one option; true once it was NBD_OPT_GO.
async fn negotiate_option(s: &mut TcpStream, flags: u16) -> bool {
    let mut h = [0u8; codec::OPTION_HEADER_LEN];
    s.read_exact(&mut h).await.unwrap();
    let (opt, len) = codec::decode_option_header(&h).unwrap();
    s.read_exact(&mut vec![0; len as usize]).await.unwrap();
    let mut out = Vec::new();
    if opt == OPT_GO {
        let info = codec::info_export(1 << 20, flags);
        out.extend(codec::encode_option_reply(opt, REP_INFO, &info));
        out.extend(codec::encode_option_reply(opt, REP_ACK, &[]));
    } else {
        out.extend(codec::encode_option_reply(opt, REP_ERR_UNSUP, &[]));
    }
    s.write_all(&out).await.unwrap();
    opt == OPT_GO
}

/// Write, trim and write-zeroes with and without FUA against a server of `flags`.
async fn fua_requests(flags: u16) -> Vec<(u16, u16)> {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ep = Endpoint::Tcp(l.local_addr().unwrap().to_string());
    let server = tokio::spawn(scripted_server(l, flags));
    let c = NbdClient::connect(&ep, &ClientOptions::default())
        .await
        .unwrap();
    for fua in [true, false] {
        c.write(0, &[1; 512], fua).await.unwrap();
        c.trim(512, 512, fua).await.unwrap();
        c.write_zeroes(1024, 512, true, fua).await.unwrap();
    }
    c.disconnect().await.unwrap();
    server.await.unwrap()
}

const BASIC: u16 = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;

#[tokio::test]
async fn fua_is_a_flush_after_every_command_when_the_server_lacks_it() {
    assert_eq!(
        fua_requests(BASIC).await,
        [
            (CMD_WRITE, 0),
            (CMD_FLUSH, 0),
            (CMD_TRIM, 0),
            (CMD_FLUSH, 0),
            (CMD_WRITE_ZEROES, 0),
            (CMD_FLUSH, 0),
            (CMD_WRITE, 0),
            (CMD_TRIM, 0),
            (CMD_WRITE_ZEROES, 0),
        ]
    );
}

#[tokio::test]
async fn fua_is_the_flag_on_every_command_when_the_server_takes_it() {
    assert_eq!(
        fua_requests(BASIC | FLAG_SEND_FUA).await,
        [
            (CMD_WRITE, CMD_FLAG_FUA),
            (CMD_TRIM, CMD_FLAG_FUA),
            (CMD_WRITE_ZEROES, CMD_FLAG_FUA),
            (CMD_WRITE, 0),
            (CMD_TRIM, 0),
            (CMD_WRITE_ZEROES, 0),
        ]
    );
}
